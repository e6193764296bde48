"""``mediar-ray segment-slides``: whole slides on Ray into OME-Zarr label images."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("mediar_ray.slides")


#: argparse type of each option's annotation (``from __future__ import annotations``
#: keeps them as text).
_TYPES = {
    "int": int,
    "int | None": int,
    "float": float,
    "float | None": float,
    "str": str,
    "str | None": str,
    "int | str": str,
    "list[str]": str,
    "dict[str, Any]": str,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The slide-job options, shared with ``jobs/segment_slides.py``: one flag per field of
    :class:`~mediar_ray.pipeline.options.SlideOptions` (``--<field-name>``), with its
    default and help; the dataclass checks the values when the options are made."""
    from dataclasses import MISSING, fields

    from mediar_ray.pipeline.options import SlideOptions

    for f in fields(SlideOptions):
        if "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        extra = dict(f.metadata["argparse"])
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag, action=action, default=f.default, help=f.metadata["help"])
            continue
        default = None if f.default is MISSING else f.default  # lists, JSON: None = unset
        if "action" not in extra:
            extra["type"] = _TYPES[f.type]
        p.add_argument(flag, default=default, help=f.metadata["help"], **extra)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segment-slides``: its options are generated from
    :class:`~mediar_ray.pipeline.options.SlideOptions` (one field, one flag).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` command line's sub-commands.
    """
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
    """The job's :class:`~mediar_ray.pipeline.options.SlideOptions` from parsed flags
    (every flag is the field of its name; ``--weights`` resolved, ``--model-config``
    parsed); raises :class:`~mediar_ray.pipeline.options.OptionError` for a value out of
    range."""
    from dataclasses import fields

    from mediar_ray.pipeline import SlideOptions
    from mediar_ray.weights import parse_model_config, resolve_weights

    values = {
        f.name: getattr(args, f.name)
        for f in fields(SlideOptions)
        if "help" in f.metadata and hasattr(args, f.name)
    }
    values["weights"] = resolve_weights(values.get("weights"))
    values["model_config"] = parse_model_config(values.get("model_config"))
    return SlideOptions(**values)


def run_job(inputs: list[str], output: str, args: argparse.Namespace) -> int:
    """Run the slide job and report; exit code 1 if any slide failed, 2 for bad options,
    inputs or outputs found before any slide was touched. Every line it prints has the
    credentials of the URLs it was given blanked (:func:`mediar_ray.io.redact`)."""
    import traceback

    from mediar_ray.io import redact, safe_url, url_secrets
    from mediar_ray.pipeline import run_slides
    from mediar_ray.pipeline.cluster import ResourceError

    secrets = url_secrets(
        [
            *inputs,
            output,
            getattr(args, "mpp_csv", None) or "",
            getattr(args, "tissue", None) or "",
            *(args.weights or []),
        ]
    )
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
    print(json.dumps({k: report[k] for k in ("done", "skipped", "failed", "elsewhere")}, indent=1))
    print(
        f"outputs: {safe_url(output)}/<slide>.zarr (labels at labels/cells/0); "
        f"run summary: {safe_url(output)}/run_summary.json"
    )
    if report["elsewhere"]:
        log.info(
            "%d slide(s) in progress in another job on this output root: %s",
            len(report["elsewhere"]),
            ", ".join(report["elsewhere"]),
        )
    if report["failed"]:
        log.error("%d slide(s) failed: %s", len(report["failed"]), ", ".join(report["failed"]))
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the slide job on the parsed arguments.

    Parameters
    ----------
    args : argparse.Namespace
        ``input``, ``output`` and the options of :class:`SlideOptions`.

    Returns
    -------
    int
        0 every slide done or skipped; 1 some slides failed (listed with their reasons,
        the others done); 2 a usage error found before any slide was touched.
    """
    return run_job(args.input, args.output, args)
