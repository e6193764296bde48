"""Entry point for `ray job submit -- python jobs/train.py --config configs/FILE.yaml`.

Trains (or resumes) MEDIAR-Former on Ray Train; options as `mediar-ray train`. Connects to
the cluster in RAY_ADDRESS (set by `ray job submit`), else starts Ray locally. Exit code 0
when training finished; 2 for what is found before Ray Train starts (a bad config, a missing
or unfitting model.init, storage that cannot be written, a reused --name, bad pairs with
--strict, workers the cluster cannot hold: on an autoscaling cluster after waiting
run.resource_timeout seconds); 1 when training failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's package

from mediar_ray.commands.train import add_arguments, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run(args)
    except Exception:
        logging.exception("training failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
