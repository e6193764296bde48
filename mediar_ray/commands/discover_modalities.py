"""``mediar-ray discover-modalities``: cluster the training images into modalities.

Exit codes: 0 when every image was embedded; 1 when some could not be read (the table is
written without them, and they are listed); 2 for bad inputs or options.
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("mediar_ray.modalities")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``discover-modalities`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "discover-modalities",
        help="K-means the training images into modality clusters (for amplified sampling)",
        description="Embed every training image (a checkpoint's encoder features, or image "
        "statistics without --checkpoint), cluster the embeddings with K-means and write "
        "the modality table (JSON: image URL -> cluster id) that a training config names "
        "in data.modality_table. Give the same mappings/roots as the training config.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="mapping JSON files (from map-dataset) and/or dataset roots",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="URL",
        help="modality table to write (path or fsspec URL)",
    )
    p.add_argument(
        "-k",
        "--k",
        "--clusters",
        dest="clusters",
        type=int,
        default=40,
        help="number of clusters (MEDIAR: 40; clamped to the number of images)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="embed with this checkpoint's encoder (default: image statistics)",
    )
    p.add_argument(
        "--model-config",
        metavar="JSON",
        help="model parameters for a .pth checkpoint (file or inline JSON)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=512,
        help="side in pixels the image is resized to before embedding",
    )
    p.add_argument("--seed", type=int, default=0, help="K-means seed")
    p.add_argument("--device", default="cpu", help="torch device of the encoder")
    p.set_defaults(func=run)


def _bases(inputs: list[str]) -> list[str]:
    """The dataset roots the table keys are made relative to: the roots given, and the
    ``root`` each mapping records."""
    import fsspec

    bases = []
    for item in inputs:
        if item.lower().endswith(".json"):
            with fsspec.open(item, "r") as f:
                root = json.load(f).get("root")
            if root:
                bases.append(root)
        else:
            bases.append(item)
    return bases


def _images(inputs: list[str]) -> list[str]:
    """Image URLs of the pairs of mapping JSONs (``*.json``) and dataset roots."""
    from mediar_ray.data.mapping import load_pairs

    mappings = [i for i in inputs if i.lower().endswith(".json")]
    roots = [i for i in inputs if not i.lower().endswith(".json")]
    return [p.image for p in load_pairs(mappings, roots)]


def _model_params(value: str | None) -> dict:
    if not value:  # mediar_ray.segment imports monai: slow, and only needed here
        return {}
    from mediar_ray.segment import parse_model_config

    return parse_model_config(value)


def run(args: argparse.Namespace) -> int:
    """Embed and cluster the training images and write the modality table.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``mediar-ray discover-modalities``.

    Returns
    -------
    int
        Exit code: 0 every image embedded; 1 some images unreadable (left out of the
        table, listed); 2 bad inputs or options.
    """
    from mediar_ray.data.modalities import discover_modalities, relative_keys, write_modality_table

    if args.clusters < 1 or args.size < 1:
        log.error("--clusters and --size must be >= 1")
        return 2
    try:
        images = _images(args.inputs)
        doc = discover_modalities(
            images,
            args.clusters,
            args.checkpoint,
            args.seed,
            args.size,
            args.device,
            _model_params(args.model_config),
        )
        doc["table"] = relative_keys(doc["table"], _bases(args.inputs))
    except (ValueError, FileNotFoundError, KeyError) as err:
        log.error("%s", err)
        return 2
    write_modality_table(doc, args.output)
    print(json.dumps({k: doc[k] for k in ("method", "k", "k_requested", "sizes")}))
    print(f"{len(doc['table'])} images in {doc['k']} clusters written to {args.output}")
    if doc["unreadable"]:
        log.error("%d image(s) could not be read and are not in the table:", len(doc["unreadable"]))
        for item in doc["unreadable"]:
            log.error("  %s: %s", item["image"], item["reason"])
        return 1
    return 0
