"""``mediar-ray map-dataset``: pair images with labels and write the mapping JSON.

Exit codes: 0 when every image has a readable label of the same size (and no label is
left over); 1 when some files are unpaired or unreadable (the mapping is still written,
with the usable pairs only, and the problems are listed on stderr and in the JSON);
2 when the root holds no dataset or the mapping cannot be written, or with ``--strict``
when any file is unpaired or unreadable (nothing is written then). A pair is bad when a
file cannot be read, the label is not one plane of whole non-negative ids (integer, or
float with whole values), or the sizes differ.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("mediar_ray.map_dataset")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``map-dataset`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "map-dataset",
        help="pair images with labels (MEDIAR layout) and write the mapping JSON",
        description="Pair ROOT/images/<name>.<ext> with ROOT/labels/<name>_label.tiff (ROOT "
        "may also be a folder of such datasets, one per source) and write the mapping "
        "JSON. <name> is the file name less its extension (.ome.tif counts as one), the "
        "name `mediar-ray segment` gives its output for the image; two images of one "
        "folder with the same name are reported as ambiguous. Training configs and "
        "discover-modalities read the mapping. Every pair is opened "
        "(headers only) to check that image and label are readable and of the same size. "
        "Exit code 0: all paired and readable; 1: some files unpaired or unreadable "
        "(listed; the mapping holds the good pairs); 2: no dataset / cannot write.",
    )
    p.add_argument("root", metavar="ROOT", help="dataset folder (local path or fsspec URL)")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="mapping JSON to write (path or URL; default: ROOT/mapping.json)",
    )
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="open every pair to check it is readable (default: on)",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="decode the pixels of every image, not only the headers (slower; "
        "labels are always decoded to check their ids)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="write no mapping and exit 2 when any file is unpaired or any pair "
        "is bad (default: list them and write the good pairs)",
    )
    p.set_defaults(func=run)


def problems(mapping: dict) -> list[tuple[str, str]]:
    """(path, what is wrong) for every unpaired or unreadable file of a mapping."""
    from mediar_ray.data.mapping import LABEL_SUFFIX

    found = [
        (path, "label without image" if path.endswith(LABEL_SUFFIX) else "image without label")
        for path in mapping["unpaired"]
    ]
    return found + [(u["path"], u["reason"]) for u in mapping["unreadable"]]


def run(args: argparse.Namespace) -> int:
    """Pair the images and labels under ``args.root`` and write the mapping JSON.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``mediar-ray map-dataset``.

    Returns
    -------
    int
        Exit code: 0 all paired and readable; 1 some files unpaired or unreadable (the
        mapping holds the good pairs); 2 no dataset, mapping not writable, or
        ``--strict`` with any bad file (nothing written).
    """
    from mediar_ray.data.mapping import write_mapping

    output = args.output or f"{args.root.rstrip('/')}/mapping.json"
    from mediar_ray.data.mapping import map_dataset

    try:
        if getattr(args, "strict", False):
            found = problems(map_dataset(args.root, args.check, args.decode))
            if found:
                for path, why in found:
                    print(f"  {why}: {path}", file=sys.stderr)
                log.error(
                    "--strict: %d file(s) of %s are unpaired or bad (listed above); "
                    "no mapping written: fix or remove them, or run without --strict",
                    len(found),
                    args.root,
                )
                return 2
        mapping = write_mapping(args.root, output, check=args.check, decode=args.decode)
    except (FileNotFoundError, PermissionError, OSError) as err:
        log.error("%s", err)
        return 2
    sources = sorted({p["source"] for p in mapping["pairs"]})
    print(
        f"{len(mapping['pairs'])} pairs from {len(sources)} source(s) "
        f"({', '.join(sources)}) written to {output}"
    )
    found = problems(mapping)
    if not found:
        return 0
    print(
        f"{len(mapping['unpaired'])} unpaired and {len(mapping['unreadable'])} "
        "unreadable file(s), left out of the mapping:",
        file=sys.stderr,
    )
    for path, why in found:
        print(f"  {why}: {path}", file=sys.stderr)
    return 1
