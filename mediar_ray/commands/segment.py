"""``mediar-ray segment``: segment image files on this machine."""

from __future__ import annotations

import argparse
import io
import logging
import time

log = logging.getLogger("mediar_ray.segment")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment image files (tif, png, jpg, bmp; local or fsspec URLs)",
        description="Segment images with MEDIAR on this machine. Writes <stem>_label.tiff "
        "(uint16 when every id fits, else uint32; zlib) per image into --output.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    p.add_argument("--output", "-o", required=True, help="output folder or fsspec URL")
    p.add_argument(
        "--weights", action="append", metavar="CKPT",
        help="checkpoint (.pth or .safetensors, path or URL); repeat for an ensemble; "
        "default: the bundled small model",
    )
    p.add_argument(
        "--model-config", metavar="JSON",
        help="model parameters as a JSON file or inline JSON (encoder_name, "
        "decoder_channels, decoder_pab_channels, ...)",
    )
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time augmentation with flips (default: on)")
    p.add_argument("--save-raw", action="store_true",
                   help="also write <stem>_raw.npy: the (3, H, W) float32 dy, dx, logit")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action="store_true", help="float16 autocast on CUDA")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--roi-size", type=int, default=512,
                   help="sliding-window size in pixels (MEDIAR: 512)")
    p.set_defaults(func=run)


def _save_npy(array, url: str) -> None:
    import fsspec
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def run(args: argparse.Namespace) -> int:
    import fsspec
    from tqdm import tqdm

    from mediar_ray.io import expand_inputs, label_name, read_image, stem, write_labels_tiff
    from mediar_ray.segment import load_models, parse_model_config, segment_image

    try:
        inputs = expand_inputs(args.inputs)
        models = load_models(args.weights, parse_model_config(args.model_config), args.device)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    fs, root = fsspec.core.url_to_fs(args.output)
    fs.makedirs(root, exist_ok=True)
    out = args.output.rstrip("/")
    failures: list[tuple[str, str]] = []
    for url in tqdm(inputs, desc="images", unit="img", disable=len(inputs) < 2):
        start = time.perf_counter()
        try:
            result = segment_image(
                read_image(url), models, tta=args.tta, device=args.device, amp=args.amp,
                sw_batch_size=args.sw_batch_size, roi_size=args.roi_size,
            )
            write_labels_tiff(result.labels, f"{out}/{label_name(url)}")
            if args.save_raw:
                _save_npy(result.raw, f"{out}/{stem(url)}_raw.npy")
        except Exception as err:  # one bad file must not stop the batch
            failures.append((url, f"{type(err).__name__}: {err}"))
            log.error("failed: %s: %s", url, err)
            continue
        log.info("%s: %d cells in %.1f s", url, int(result.labels.max()),
                 time.perf_counter() - start)
    log.info("done: %d of %d images segmented into %s",
             len(inputs) - len(failures), len(inputs), args.output)
    if failures:
        log.error("%d image(s) failed:", len(failures))
        for url, why in failures:
            log.error("  %s: %s", url, why)
        return 1
    return 0
