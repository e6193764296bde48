"""Argument types that check a numeric option before any work starts.

argparse calls them while parsing: a value out of range stops the command at once with
exit code 2 and one line naming the option, the value and the valid range, e.g.
``argument --roi-size: 100 is not valid: a multiple of 32 from 32 to 4096``.
"""

from __future__ import annotations

import argparse
from typing import Callable


def int_range(low: int, high: int | None = None, multiple: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high] (no upper bound when ``high`` is
    None) that is a multiple of ``multiple``."""
    parts = [f"a multiple of {multiple}" if multiple > 1 else "an integer"]
    parts.append(f"from {low} to {high}" if high is not None else f"of at least {low}")
    valid = " ".join(parts)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: {valid}") from None
        if value < low or (high is not None and value > high) or value % multiple:
            raise argparse.ArgumentTypeError(f"{value} is not valid: {valid}")
        return value

    parse.__name__ = "integer"  # what argparse names the type in its own messages
    return parse


#: Sliding-window size: the network needs multiples of 32 (five stride-2 stages); the upper
#: bound stops a typo (5120 for 512) before it allocates a window 100 times larger.
roi_size = int_range(32, 4096, multiple=32)

#: Windows per forward pass, or images per batch.
batch_size = int_range(1, 1024)

#: A count of workers, epochs, ...
positive_int = int_range(1)


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--batch-size`` (alias ``--sw-batch-size``) of the commands
    that run the network (``args.precision``, ``args.batch_size``; None = the device's
    default)."""
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="number format of the network forward (normalisation, blending and flows "
        "stay float32). auto (default): bf16 on CPUs with AMX/AVX512-BF16 units and on "
        "CUDA GPUs of compute capability 8.0 or newer, fp16 on older CUDA GPUs, else "
        "fp32. fp16 is refused on CPUs; use fp32 for bit-reproducible outputs",
    )
    parser.add_argument(
        "--batch-size",
        dest="batch_size",
        type=batch_size,
        default=None,
        help="windows per forward pass, 1 to 1024 (default: 4 on a CPU, 32 on a CUDA GPU; "
        "halved on a GPU out-of-memory error)",
    )
    parser.add_argument(
        "--sw-batch-size",
        dest="batch_size",
        type=batch_size,
        default=None,
        help="old spelling of --batch-size",
    )
    parser.add_argument(
        "--amp",
        dest="precision",
        action="store_const",
        const="fp16",
        help="old spelling of --precision fp16",
    )
