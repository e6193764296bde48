"""``mediar-ray train``: MEDIAR training on Ray Train from a config file."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from mediar_ray.commands.options import positive_int

log = logging.getLogger("mediar_ray.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The training options, shared with ``jobs/train.py``; flags override the config."""
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="training config (YAML/JSON, local or URL), see configs/",
    )
    p.add_argument("--name", help="run name (default: the config's); same name = resume")
    p.add_argument(
        "--storage-path",
        metavar="URL",
        help="where checkpoints go: a folder or s3://... (shared on clusters)",
    )
    p.add_argument("--num-workers", type=positive_int, help="DDP workers (at least 1)")
    p.add_argument(
        "--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker"
    )
    p.add_argument("--epochs", type=positive_int, help="total epochs of the schedule (at least 1)")
    p.add_argument(
        "--max-epochs-this-run",
        type=positive_int,
        metavar="N",
        help="stop after N epochs (at least 1); running again resumes",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="refuse to start when any image/label pair is bad (default: list "
        "the bad pairs and train on the good ones)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="a run of this name with another config or other data exists: "
        "delete its checkpoints and start again (default: refuse)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "train",
        help="train MEDIAR-Former on Ray Train",
        description="Train (or resume) a MEDIAR-Former with Ray Train from a config file. "
        "Checkpoints go to STORAGE_PATH/NAME/checkpoint_epoch_*; rerunning with the same "
        "name and storage path resumes from the latest one.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The config file with the command-line overrides applied (and validated)."""
    from mediar_ray.train.config import TrainConfig, load_config, read_config_data

    load_config(args.config)  # errors name the file alone when the file is at fault
    # The file's own keys, not the filled-in defaults: model.init fills the model keys
    # the file leaves out from the checkpoint.
    cfg = read_config_data(args.config)
    for flag, (section, key) in {
        "name": (None, "name"),
        "storage_path": ("run", "storage_path"),
        "num_workers": ("run", "num_workers"),
        "use_gpu": ("run", "use_gpu"),
        "epochs": ("optim", "epochs"),
        "strict": ("data", "strict"),
    }.items():
        value = getattr(args, flag, None)
        if value is not None:
            if section is None:
                cfg[key] = value
            else:
                cfg[section] = {**(cfg.get(section) or {}), key: value}
    return TrainConfig.from_dict(cfg, source=f"{args.config} (with command-line options)")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the training of the config with the command-line overrides,
    and print the run summary as JSON.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``mediar-ray train``.

    Returns
    -------
    int
        Exit code: 0 trained; 2 bad config, data or storage.
    """
    from mediar_ray.io import safe_url
    from mediar_ray.train.loop import run_training

    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    try:
        summary = run_training(
            cfg, args.max_epochs_this_run, overwrite=getattr(args, "overwrite", False)
        )
    except (ValueError, FileNotFoundError, PermissionError) as err:
        # bad data roots, mappings or storage found while preparing the run
        log.error("%s: %s", args.config, err)
        log.debug("traceback:", exc_info=True)
        return 2
    where = f"{safe_url(cfg.run.storage_path.rstrip('/'))}/{cfg.name}"
    print(json.dumps({**summary, "run": where}, indent=1, default=str))
    log.info("checkpoints of run %s are in %s", cfg.name, where)
    return 0
