"""``mediar-ray segment-slides``: whole slides on Ray into OME-Zarr label images."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("mediar_ray.slides")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The slide-job options, shared with ``jobs/segment_slides.py``."""
    p.add_argument("--weights", action="append", metavar="CKPT",
                   help="checkpoint path or URL; repeat for an ensemble (default: bundled model)")
    p.add_argument("--model-config", metavar="JSON", help="model parameters (file or inline JSON)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time augmentation (default: on)")
    p.add_argument("--tile-size", type=int, default=1024,
                   help="tile and chunk side in pixels (memory per worker grows with it; "
                        "a slide smaller than a tile is one chunk of its own size)")
    p.add_argument("--halo", type=int, default=128,
                   help="flow-tracking halo in pixels (at least the largest cell diameter)")
    p.add_argument("--roi-size", type=int, default=None,
                   help="sliding-window size (default: the crop size the weights were "
                   "trained on, stored in mediar_ray checkpoints: 256 for the bundled "
                   "model; else MEDIAR's 512)")
    p.add_argument("--workers", type=int, default=1,
                   help="model actors, living for the whole job (one per GPU on GPUs)")
    p.add_argument("--num-gpus-per-worker", type=float, default=0.0,
                   help="GPUs per model actor; > 0 runs the models on CUDA")
    p.add_argument("--device", default="cpu", help="cpu or cuda (for CPU actors: cpu)")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are complete")
    p.add_argument("--max-slides-in-flight", type=int, default=0, metavar="N",
                   help="slides prepared, inferred or finished at once (bounds scratch "
                   "storage and memory; default 0: 2 x workers + 4)")
    p.add_argument("--cpus-per-worker", type=float, default=0.0,
                   help="CPUs each model actor requests (default: 1 with GPUs, else 0.75, "
                   "leaving room on its node for the CPU stages)")
    p.add_argument("--cpus-per-task", type=float, default=0.25,
                   help="CPUs each CPU-stage task requests (plan, gather, track, ...)")
    p.add_argument("--resource-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="on an autoscaling cluster, how long to wait for a node that can "
                   "hold a model actor")
    p.add_argument("--target-mpp", type=float, metavar="UM",
                   help="process every slide at this pixel size (micrometres per pixel): "
                   "read from the pyramid level closest to it without being coarser, "
                   "resampled tile by tile (default: each slide's level 0)")
    p.add_argument("--mpp", type=float, metavar="UM",
                   help="pixel size of level 0 for all slides, instead of their metadata")
    p.add_argument("--mpp-csv", metavar="CSV",
                   help="per-slide pixel sizes: a CSV with columns slide,mpp (slide = file "
                   "name, name without extension, or URL)")
    p.add_argument("--tissue", default="auto", metavar="auto|off|MASK_URL",
                   help="skip windows that touch no tissue: detect it (auto: slides of "
                   "2048 px or more), off, or a mask image ({name} = the slide's name)")
    p.add_argument("--copy-image", action="store_true",
                   help="keep a full copy of the processed image in the output (default: "
                   "a viewing pyramid from 1/4 of the processing resolution)")
    p.add_argument("--labels-level0", action="store_true",
                   help="also write the labels on the slide's level-0 grid "
                   "(labels/cells_level0) when processing at another resolution")
    p.add_argument("--cells", action=argparse.BooleanOptionalAction, default=True,
                   help="write the per-cell table OUTPUT/cells (Parquet, partitioned by "
                   "slide; default: on)")
    p.add_argument("--geojson", action="store_true",
                   help="also write OUTPUT/<name>.geojson.gz: cell outlines for QuPath")
    p.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16",
                   help="arithmetic of the model's forward pass (default auto: bf16 on GPUs "
                   "that have it, else fp32); part of a slide's result")
    p.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="windows per forward pass (default 0: the device's default)")
    p.add_argument("--reader", default="auto",
                   help="slide reader: auto (by content and name) or a reader's name "
                   "(tifffile, openslide, wsidicom, ome-zarr, pillow)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment-slides",
        help="segment whole slides on Ray into OME-Zarr labels",
        description="Segment an archive of slides on Ray: TIFF pyramids (SVS, OME-TIFF), "
        "OpenSlide formats (MRXS, NDPI, SCN, BIF, VMS), DICOM WSI folders, OME-Zarr and "
        "PNG/JPEG, given as files, folders, globs or fsspec URLs. Each slide becomes "
        "OUTPUT/<name>.zarr with labels at labels/cells/0, and its cells a partition of "
        "OUTPUT/cells. Complete slides are skipped on a rerun with the same inputs and "
        "options.",
    )
    p.add_argument("input", metavar="INPUT", nargs="+")
    p.add_argument("output", metavar="OUTPUT")
    add_arguments(p)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from mediar_ray.pipeline import SlideOptions
    from mediar_ray.weights import parse_model_config, resolve_weights

    weights = resolve_weights(args.weights)
    return SlideOptions(
        weights=weights, model_config=parse_model_config(args.model_config), tta=args.tta,
        roi_size=args.roi_size, tile=args.tile_size, halo=args.halo, workers=args.workers,
        num_gpus_per_worker=args.num_gpus_per_worker, device=args.device,
        overwrite=args.overwrite, reader=args.reader,
        max_slides_in_flight=args.max_slides_in_flight, cpus_per_worker=args.cpus_per_worker,
        cpus_per_task=args.cpus_per_task, resource_timeout=args.resource_timeout,
        target_mpp=args.target_mpp, mpp=args.mpp, mpp_csv=args.mpp_csv, tissue=args.tissue,
        copy_image=args.copy_image, labels_level0=args.labels_level0, cells=args.cells,
        geojson=args.geojson, precision=args.precision, batch_size=args.batch_size,
    )


def run_job(inputs: list[str], output: str, args: argparse.Namespace) -> int:
    """Run the slide job and report; exit code 1 if any slide failed, 2 for bad options,
    inputs or outputs found before any slide was touched. Every line it prints has the
    credentials of the URLs it was given blanked (:func:`mediar_ray.io.redact`)."""
    import traceback

    from mediar_ray.io import redact, safe_url, url_secrets
    from mediar_ray.pipeline import run_slides
    from mediar_ray.pipeline.cluster import ResourceError

    secrets = url_secrets([*inputs, output, getattr(args, "mpp_csv", None) or "",
                           getattr(args, "tissue", None) or "", *(args.weights or [])])
    try:
        opts = options_from_args(args)
        report = run_slides(inputs, output, opts)
    except (ValueError, ResourceError, PermissionError, FileNotFoundError) as err:
        # Bad options, weights or inputs, an unwritable output, missing GPUs: found
        # before any slide was touched.
        log.error("%s", redact(err, *secrets))
        return 2
    except Exception:  # noqa: BLE001 - a fault of ours: its trace, without credentials
        log.error("the job stopped: %s", redact(traceback.format_exc(), *secrets))
        return 1
    print(json.dumps({k: report[k] for k in ("done", "skipped", "failed", "elsewhere")},
                     indent=1))
    print(f"outputs: {safe_url(output)}/<slide>.zarr (labels at labels/cells/0); "
          f"run summary: {safe_url(output)}/run_summary.json")
    if report["elsewhere"]:
        log.info("%d slide(s) in progress in another job on this output root: %s",
                 len(report["elsewhere"]), ", ".join(report["elsewhere"]))
    if report["failed"]:
        log.error("%d slide(s) failed: %s", len(report["failed"]), ", ".join(report["failed"]))
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    return run_job(args.input, args.output, args)
