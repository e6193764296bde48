"""The root of every error a user can meet and fix (bottom layer: imports nothing).

A :class:`UserError` means "an input, an option, a checkpoint or the environment must be
changed": the command line prints its message (one line naming the file or option and the
fix) and exits with code 2 instead of showing a traceback. Every module's own user-error
class derives from it, so callers catch one class.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """An error the user fixes by changing an input, option, checkpoint or environment."""
