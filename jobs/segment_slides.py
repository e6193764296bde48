"""Entry point for `ray job submit -- python jobs/segment_slides.py --input ... --output ...`.

Options come from the command line and, optionally, a YAML/JSON file (`--config FILE`,
keys named like the flags: tile_size, workers, ...); flags win. Connects to the cluster
in RAY_ADDRESS (set by `ray job submit`), else starts Ray locally.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's package

from mediar_ray.commands.segment_slides import add_arguments, run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, nargs="+", help="slides: files, folders, globs, URLs")
    parser.add_argument("--output", required=True, help="output root (local path or URL)")
    parser.add_argument("--config", help="YAML/JSON file with default option values")
    add_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    if args.config:
        import yaml

        with open(args.config) as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_job(args.input, args.output, args)


if __name__ == "__main__":
    sys.exit(main())
