"""``mediar-ray cells OUTPUT``: per-slide summary of an archive's cell table."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``cells`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "cells",
        help="per-slide summary of an archive's cell table (OUTPUT/cells/)",
        description="Summarise the cell table a slide job wrote under OUTPUT/cells/ "
        "(local folder or fsspec URL such as s3://bucket/prefix): cells per slide, "
        "density per mm^2 where the pixel size is known (of the tissue area when the "
        "job measured it, else of the whole slide) and area quantiles.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the slide job's output root")
    p.add_argument("--json", action="store_true", help="print JSON lines, one per slide")
    p.set_defaults(func=run)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:,.{digits}f}"


def format_rows(rows: list[dict]) -> str:
    """The summary as an aligned text table, with a total line."""
    head = ["slide", "cells", "per mm2", "basis", "area px q05/q50/q95", "median um2", "note"]
    lines = [head]
    for r in rows:
        q = r["area_px"]
        note = "" if r["clean"] else f"{r['runs']} runs: interrupted rewrite, rerun the slide"
        lines.append(
            [
                r["slide"],
                f"{r['cells']:,}",
                _fmt(r.get("density_per_mm2")),
                r.get("basis", "-"),
                "/".join(_fmt(q[k], 0) for k in ("0.05", "0.5", "0.95")),
                _fmt(r.get("area_um2", {}).get("0.5")),
                note,
            ]
        )
    lines.append(
        ["total", f"{sum(r['cells'] for r in rows):,}", "", "", "", "", f"{len(rows)} slides"]
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    """Print the summary; exit code 1 when a slide's partition was left half-rewritten."""
    from mediar_ray.cells.summary import summarize_archive
    from mediar_ray.io import InputError, safe_url

    rows = summarize_archive(args.output)  # unreadable roots and credentials: cli's errors
    if not rows:
        raise InputError(
            f"no cell table under {safe_url(args.output)}/cells/: give the "
            "output root of a segment-slides run that has finished slides"
        )
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_rows(rows))
    return 0 if all(r["clean"] for r in rows) else 1
