"""Which checkpoints a run uses, reading them, and the model configuration option.

Light on purpose (fsspec only, no torch): the slide job's driver resolves, reads and
hashes the checkpoints without importing the model code, which only its model actors
load.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from importlib import resources
from typing import IO, Any, Iterator, Sequence

import fsspec

__all__ = ["CheckpointError", "checkpoint_sha256", "default_weights", "parse_model_config",
           "read_checkpoint_bytes", "resolve_weights"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def default_weights() -> str | None:
    """Path of the small model bundled with the package, or None if it is absent."""
    asset = resources.files("mediar_ray") / "assets" / "cpu_small.safetensors"
    return str(asset) if asset.is_file() else None


def resolve_weights(weights: Sequence[str] | None) -> list[str]:
    """The checkpoints to use: ``weights``, or the bundled model when none are given."""
    paths = list(weights or [])
    if paths:
        return paths
    bundled = default_weights()
    if bundled is None:
        raise ValueError(
            "no weights given and no bundled model in this installation: pass "
            "--weights CHECKPOINT (.pth of the original MEDIAR or our .safetensors)"
        )
    return [bundled]


@contextmanager
def _open_checkpoint(url: str) -> Iterator[IO[bytes]]:
    """``url`` opened for reading; errors become a :class:`CheckpointError` naming it."""
    from mediar_ray.io import describe_error, loggable

    try:
        with fsspec.open(url, "rb") as f:
            yield f
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {loggable(url)}; check the --weights "
                              "path or URL") from None
    except Exception as err:  # network, permissions, bad URL scheme, no credentials
        raise CheckpointError(f"cannot read checkpoint {loggable(url)}: "
                              f"{describe_error(err)}") from None


def read_checkpoint_bytes(url: str) -> bytes:
    """The whole checkpoint file at ``url`` (any fsspec URL)."""
    with _open_checkpoint(url) as f:
        return f.read()


def checkpoint_sha256(url: str) -> str:
    """SHA-256 (hex) of the checkpoint at ``url``, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with _open_checkpoint(url) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_model_config(value: str | None) -> dict[str, Any]:
    """Model parameters from a JSON file/URL, or an inline JSON object, or None -> {}.

    Accepts either the parameters themselves or an object with a ``model_params`` key
    (the layout of MEDIAR's config files and of the reference fixtures' index.json).
    """
    if not value:
        return {}
    text = value if value.lstrip().startswith("{") else _read_text(value)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-config {value}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"--model-config {value}: expected a JSON object")
    return dict(obj.get("model_params", obj))


def _read_text(url: str) -> str:
    from mediar_ray.io import describe_error, loggable

    try:
        with fsspec.open(url, "r") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"--model-config {loggable(url)}: file not found") from None
    except Exception as err:  # bad URL scheme, no access, no credentials, not text
        raise ValueError(f"--model-config {loggable(url)}: cannot read "
                         f"({describe_error(err)})") from None
