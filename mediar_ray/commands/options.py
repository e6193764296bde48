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
