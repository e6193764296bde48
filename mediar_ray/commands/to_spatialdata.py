"""``mediar-ray to-spatialdata OUTPUT/<name>.zarr DEST.zarr``: a slide output as a
SpatialData store (:mod:`mediar_ray.export.spatialdata`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``to-spatialdata`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "to-spatialdata",
        help="write a slide output as a SpatialData store (needs mediar_ray[spatialdata])",
        description="Write OUTPUT/<name>.zarr of segment-slides as a SpatialData store that "
        "spatialdata.read_zarr opens: the image pyramid, the cells and tissue labels, the "
        "cell outlines as shapes and an AnnData table (one row per cell, annotating the "
        "cells labels by id), in the slide's micrometre coordinate system ('global'). "
        "Labels and outlines are streamed chunk by chunk.",
    )
    p.add_argument("source", metavar="OUTPUT/NAME.zarr", help="a complete slide output")
    p.add_argument("dest", metavar="DEST.zarr", help="the SpatialData store to write")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the slide output ``args.source`` as the SpatialData store ``args.dest`` and
    print its summary as JSON.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``mediar-ray to-spatialdata``.

    Returns
    -------
    int
        Exit code 0 (errors are raised for :func:`mediar_ray.cli.main` to report).
    """
    from mediar_ray.export.spatialdata import to_spatialdata

    summary = to_spatialdata(args.source, args.dest, overwrite=args.overwrite)
    print(json.dumps(asdict(summary)))
    return 0
