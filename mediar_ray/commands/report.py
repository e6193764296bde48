"""``mediar-ray report OUTPUT``: rebuild a slide job's ``OUTPUT/report.html``."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``report`` sub-command."""
    p = subparsers.add_parser(
        "report",
        help="rebuild OUTPUT/report.html, the run report of a slide job",
        description="Build OUTPUT/report.html from what a segment-slides job left in its "
        "output root (local folder or fsspec URL): the run at a glance, one row per slide "
        "with its thumbnail, cells, cells per mm^2 of tissue, median cell area and tissue "
        "fraction, the slides that look wrong flagged. One self-contained file: open it in "
        "a browser beside the slides' folders.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the slide job's output root")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report; exit code 2 when the root holds no output of a slide job."""
    import fsspec

    from mediar_ray.io import InputError, safe_url
    from mediar_ray.pipeline.report import collect, render

    fs, root = fsspec.core.url_to_fs(args.output)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/run_summary.json") and not fs.glob(f"{root}/*.zarr/summary.json"):
        raise InputError(
            f"{safe_url(args.output)} holds no run_summary.json and no "
            "<slide>.zarr/summary.json: give the output root of a "
            "segment-slides job"
        )
    report = collect(args.output)
    target = f"{args.output.rstrip('/')}/report.html"
    with fsspec.open(target, "w", encoding="utf-8") as f:
        f.write(render(report))
    flagged = sum(1 for r in report.slides if r.flags)
    failed = sum(1 for r in report.slides if r.status == "failed")
    print(
        f"report: {safe_url(target)} ({len(report.slides)} slides, {failed} failed, "
        f"{flagged} flagged)"
    )
    return 0
