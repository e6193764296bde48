"""Entry point for `ray job submit -- python jobs/segment_slides.py --input ... --output ...`.

Options come from the command line and, optionally, a YAML/JSON file (`--config FILE`,
local or any fsspec URL; keys named like the flags: tile_size or tile-size, workers,
input, output, ...); flags win. Connects to the cluster in RAY_ADDRESS (set by `ray job
submit`), else starts Ray locally. Prints where the outputs went and writes
OUTPUT/run_summary.json. Exit code 0 when every slide is done or skipped, 1 when a slide
or the job failed, 2 for bad options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's package

from mediar_ray.commands.segment_slides import add_arguments, run_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", help="slides: files, folders, globs, URLs")
    parser.add_argument("--output", help="output root (local path or URL)")
    parser.add_argument("--config", help="YAML/JSON file (or URL) with option values")
    add_arguments(parser)
    return parser


def config_defaults(url: str, parser: argparse.ArgumentParser) -> dict:
    """The option values of a config file, checked against the parser's options."""
    import fsspec
    import yaml

    with fsspec.open(url, "r") as f:
        values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
    if not isinstance(values, dict):
        parser.error(f"config {url} must be a mapping of option names to values")
    known = {a.dest for a in parser._actions} - {"help", "config"}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"config {url}: unknown option(s) {unknown}; allowed: {sorted(known)}")
    if isinstance(values.get("input"), str):
        values["input"] = [values["input"]]
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags over config-file values over defaults; exits with code 2 on bad options."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        try:
            parser.set_defaults(**config_defaults(args.config, parser))
        except (OSError, ValueError) as err:  # missing file, bad YAML
            parser.error(f"cannot read config {args.config}: {err}")
    args = parser.parse_args(argv)
    if not args.input or not args.output:
        parser.error("--input and --output are required (as flags or in the config)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run_job(args.input, args.output, args)
    except Exception:  # e.g. an unwritable output root: say why, exit non-zero
        logging.exception("slide job failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
