"""``mediar-ray evaluate``: CellSeg F1 of predicted labels against ground truth.

Exit codes: 0 when every prediction with a ground truth was scored; 1 when some pair
could not be scored (unreadable file, sizes differ: listed, every other pair still
scored and reported) or nothing could be paired; 2 for a usage error (missing folder,
bad option, weights that cannot be loaded).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mediar_ray.commands.options import add_precision_options, roi_size

log = logging.getLogger("mediar_ray.evaluate")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "evaluate",
        help="score <name>_label.tiff predictions against ground truth",
        description="NeurIPS 2022 CellSeg F1 at IoU 0.5 (cells touching a 2-pixel border "
        "dropped from both sides) for every prediction with a ground truth "
        "(<name>_label.tiff or <name>.tif[f]). Exit code 0: all scored; 1: some pairs "
        "could not be scored (listed; the rest are scored); 2: usage error.",
    )
    p.add_argument("--pred", help="folder of <stem>_label.tiff predictions")
    p.add_argument("--gt", help="folder of ground-truth labels")
    p.add_argument("--csv", help="also write the per-image table to this CSV file/URL")
    p.add_argument(
        "--keep-border", action="store_true", help="do not drop cells that touch the image border"
    )
    held = p.add_argument_group(
        "split of a training config",
        "instead of --pred/--gt: segment the held-out (or training) pairs of a training "
        "config (as `mediar-ray segment` would) and report F1 per source",
    )
    held.add_argument("--config", metavar="FILE", help="training config (configs/*.yaml)")
    held.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="which pairs of the config to score (default: heldout; train "
        "tells underfitting from overfitting)",
    )
    held.add_argument(
        "--weights",
        action="append",
        metavar="CKPT",
        help="checkpoint(s); default: the bundled model",
    )
    held.add_argument("--model-config", metavar="JSON", help="parameters of a .pth checkpoint")
    held.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="test-time augmentation (default: on, as `segment`)",
    )
    held.add_argument(
        "--roi-size",
        type=roi_size,
        default=None,
        help="sliding-window size (default: as `segment`, each model's own: "
        "the crop size it was trained on, else 512)",
    )
    held.add_argument("--json", metavar="URL", help="also write the report as JSON")
    held.add_argument(
        "--compare",
        action="append",
        metavar="CKPT",
        help="also score these checkpoint(s) (e.g. the previous model) on "
        "the same pairs and print both in one table",
    )
    held.add_argument(
        "--groups",
        action="append",
        metavar="CSV",
        help="CSV of image name -> group (columns: stem, group; e.g. "
        "dsb2018/categories.csv, nuinsseg/organs.csv): adds a row per group",
    )
    add_precision_options(held)
    p.set_defaults(func=run)


def run_split(args: argparse.Namespace) -> int:
    """Score ``args.split`` of ``args.config``; prints per image and per source."""
    import json

    import fsspec

    from mediar_ray.precision import resolve_precision
    from mediar_ray.segment import load_models, models_window, parse_model_config
    from mediar_ray.train.config import load_config
    from mediar_ray.train.loop import split_config_pairs
    from mediar_ray.train.validate import validate

    try:
        cfg = load_config(args.config)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    try:
        train, held = split_config_pairs(cfg)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s: %s", args.config, err)
        return 1
    pairs = held if args.split == "heldout" else train
    if not pairs:
        log.error(
            "%s has no %s pairs (data.holdout_every = %d)",
            args.config,
            args.split,
            cfg.data.holdout_every,
        )
        return 1
    try:
        resolve_precision(args.precision, "cpu")  # fp16 on a CPU: exit 2 before any work
        models = load_models(args.weights, parse_model_config(args.model_config), "cpu")
        roi = args.roi_size or models_window(models)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    rows: list = []
    bad: list = []
    report = validate(
        models,
        pairs,
        roi_size=roi,
        tta=args.tta,
        per_image=rows,
        bad=bad,
        precision=args.precision,
        sw_batch_size=args.batch_size,
    )
    for pair in bad:
        print(f"not scored: {pair.reason}", file=sys.stderr)
    report["roi_size"] = roi
    for image, source, f1, n_true, n_pred in rows:
        print(
            f"{source:<18} {image.rsplit('/', 1)[-1][:40]:<40} F1 {f1:.4f} "
            f"true {n_true:5d} pred {n_pred:5d}"
        )
    for key, value in report.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    compared: list = []
    if args.compare:
        try:
            other = load_models(args.compare, parse_model_config(args.model_config), "cpu")
            other_roi = args.roi_size or models_window(other)
        except (ValueError, FileNotFoundError) as err:
            log.error("--compare: %s", err)
            return 2
        print(f"--compare: {other_roi}-px windows")
        validate(
            other,
            pairs,
            roi_size=other_roi,
            tta=args.tta,
            per_image=compared,
            bad=[],
            precision=args.precision,
            sw_batch_size=args.batch_size,
        )
    try:
        groups = _read_groups(args.groups or [])
    except (ValueError, OSError) as err:
        log.error("--groups: %s", err)
        return 2
    table = comparison_rows(rows, compared, groups)
    print_comparison(table, ["this model"] + (["--compare"] if compared else []))
    if args.json:

        def dump() -> None:
            with fsspec.open(args.json, "w") as f:
                json.dump(
                    {
                        "config": args.config,
                        "split": args.split,
                        "tta": args.tta,
                        **report,
                        "images": [
                            dict(zip(("image", "source", "f1", "true", "pred"), r)) for r in rows
                        ],
                        "table": table,
                    },
                    f,
                    indent=1,
                )

        if not _write(dump, "--json", args.json):
            return 2
    return 0


def _read_groups(urls: list[str]) -> dict[str, str]:
    """Image name (file name less extension) -> group, from CSVs of two columns."""
    import csv

    import fsspec

    groups: dict[str, str] = {}
    for url in urls:
        with fsspec.open(url, "r") as f:
            for row in csv.reader(f):
                if len(row) == 2 and row[0] != "stem":
                    groups[row[0]] = row[1]
    return groups


def comparison_rows(rows: list, compared: list, groups: dict[str, str]) -> list[dict]:
    """Mean F1 of all images, of each source and of each group (with their image
    counts), for this model's ``rows`` and the compared model's (same images)."""
    from mediar_ray.io import image_name

    def key_sets(image: str, source: str) -> list[str]:
        keys = ["all images", f"source {source}"]
        group = groups.get(image_name(image))
        return keys + ([f"  {source}: {group}"] if group else [])

    table: dict[str, dict] = {}
    for i, (image, source, f1, *_) in enumerate(rows):
        for key in key_sets(image, source):
            entry = table.setdefault(key, {"row": key, "images": 0, "f1": [], "compare": []})
            entry["images"] += 1
            entry["f1"].append(f1)
            if compared:
                entry["compare"].append(compared[i][2])

    def order(entry: dict) -> tuple:
        name = entry["row"]
        return (0 if name == "all images" else 1 if name.startswith("source") else 2, name)

    out = []
    for entry in sorted(table.values(), key=order):
        row = {
            "row": entry["row"],
            "images": entry["images"],
            "f1": sum(entry["f1"]) / entry["images"],
        }
        if entry["compare"]:
            row["f1_compare"] = sum(entry["compare"]) / entry["images"]
        out.append(row)
    return out


def print_comparison(table: list[dict], names: list[str]) -> None:
    """One line per row of :func:`comparison_rows`."""
    print("\n| " + " | ".join(["", "images"] + names) + " |")
    print("|" + "---|" * (2 + len(names)))
    for row in table:
        cells = [row["row"], str(row["images"]), f"{row['f1']:.3f}"]
        if "f1_compare" in row:
            cells.append(f"{row['f1_compare']:.3f}")
        print("| " + " | ".join(cells) + " |")


def _write(write, option: str, url: str) -> bool:
    """Run ``write``; on failure log one line naming the option and the fix."""
    from mediar_ray.io import describe_error, safe_url

    try:
        write()
    except Exception as err:  # the scores are printed already; say why the file is not
        log.error(
            "%s %s: cannot write (%s); choose a writable path",
            option,
            safe_url(url),
            describe_error(err),
        )
        return False
    log.info("wrote %s", safe_url(url))
    return True


def run(args: argparse.Namespace) -> int:
    """Score the predictions of ``--pred`` against ``--gt`` (or, with ``--config``, a
    training config's split, see :func:`run_split`) and print the per-image table.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``mediar-ray evaluate``.

    Returns
    -------
    int
        Exit code: 0 every pair scored; 1 some pairs not scored or none paired; 2 usage
        error (missing folder, bad option, unwritable ``--csv``).
    """
    from mediar_ray.evaluate import evaluate_dirs, pair_files, write_csv

    if args.config:
        return run_split(args)
    if not (args.pred and args.gt):
        log.error("give --pred and --gt, or --config for a training config's held-out split")
        return 2

    try:
        pairs, missing = pair_files(args.pred, args.gt)
    except FileNotFoundError as err:
        log.error("%s", err)
        return 2
    for stem in missing:
        log.warning("no ground truth for %s: skipped", stem)
    if not pairs:
        log.error("no prediction in %s has a ground truth in %s", args.pred, args.gt)
        return 1
    failures: list[tuple[str, str]] = []
    scores = evaluate_dirs(args.pred, args.gt, drop_border=not args.keep_border, failures=failures)
    if scores:
        print_table(scores)
    if args.csv and scores:
        if not _write(lambda: write_csv(scores, args.csv), "--csv", args.csv):
            return 2
    if failures:
        log.error(
            "%d of %d pair(s) could not be scored (left out of the mean):",
            len(failures),
            len(pairs),
        )
        for name, why in failures:
            log.error("  %s: %s", name, why)
        return 1
    return 0


def print_table(scores: list) -> None:
    """Per-image precision, recall, F1 and counts, then the mean row."""
    width = max(len(s.name) for s in scores)
    print(f"{'image':<{width}}  precision  recall      F1   true   pred")
    for s in scores:
        print(
            f"{s.name:<{width}}  {s.precision:9.4f} {s.recall:7.4f} {s.f1:7.4f} "
            f"{s.n_true:6d} {s.n_pred:6d}"
        )
    n = len(scores)
    print(
        f"{'mean':<{width}}  {sum(s.precision for s in scores) / n:9.4f} "
        f"{sum(s.recall for s in scores) / n:7.4f} {sum(s.f1 for s in scores) / n:7.4f}"
    )
