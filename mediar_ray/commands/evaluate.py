"""``mediar-ray evaluate``: CellSeg F1 of predicted labels against ground truth."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("mediar_ray.evaluate")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score <stem>_label.tiff predictions against ground truth",
        description="NeurIPS 2022 CellSeg F1 at IoU 0.5 (cells touching a 2-pixel border "
        "dropped from both sides) for every prediction with a ground truth "
        "(<stem>_label.tiff or <stem>.tif[f]).",
    )
    p.add_argument("--pred", required=True, help="folder of <stem>_label.tiff predictions")
    p.add_argument("--gt", required=True, help="folder of ground-truth labels")
    p.add_argument("--csv", help="also write the per-image table to this CSV file/URL")
    p.add_argument("--keep-border", action="store_true",
                   help="do not drop cells that touch the image border")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mediar_ray.evaluate import evaluate_dirs, pair_files, write_csv

    pairs, missing = pair_files(args.pred, args.gt)
    for stem in missing:
        log.warning("no ground truth for %s: skipped", stem)
    if not pairs:
        log.error("no prediction in %s has a ground truth in %s", args.pred, args.gt)
        return 1
    scores = evaluate_dirs(args.pred, args.gt, drop_border=not args.keep_border)
    width = max(len(s.name) for s in scores)
    print(f"{'image':<{width}}  precision  recall      F1   true   pred")
    for s in scores:
        print(f"{s.name:<{width}}  {s.precision:9.4f} {s.recall:7.4f} {s.f1:7.4f} "
              f"{s.n_true:6d} {s.n_pred:6d}")
    n = len(scores)
    print(f"{'mean':<{width}}  {sum(s.precision for s in scores) / n:9.4f} "
          f"{sum(s.recall for s in scores) / n:7.4f} {sum(s.f1 for s in scores) / n:7.4f}")
    if args.csv:
        write_csv(scores, args.csv)
        log.info("wrote %s", args.csv)
    return 0
