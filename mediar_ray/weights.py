"""Which checkpoints a run uses, reading them, and the model configuration option.

Light on purpose (fsspec only, no torch): the slide job's driver resolves, reads and
hashes the checkpoints without importing the model code, which only its model actors
load.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import contextmanager
from importlib import resources
from typing import IO, Any, Iterable, Iterator, Sequence

import fsspec

from mediar_ray.errors import UserError

__all__ = [
    "CheckpointError",
    "DEFAULT_ROI_SIZE",
    "checkpoint_metadata",
    "checkpoint_sha256",
    "common_window",
    "default_weights",
    "parse_model_config",
    "read_checkpoint_bytes",
    "resolve_weights",
    "trained_window",
    "window_size",
]

#: MEDIAR's sliding window, for checkpoints that do not say what crops they were trained on
#: (MEDIAR's own were trained on 512-px crops).
DEFAULT_ROI_SIZE = 512
_MAX_HEADER = 100 << 20  # a safetensors JSON header larger than this is not one of ours


class CheckpointError(UserError):
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
    from mediar_ray.io import describe_error, safe_url

    try:
        with fsspec.open(url, "rb") as f:
            yield f
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {safe_url(url)}; check the --weights path or URL"
        ) from None
    except Exception as err:  # network, permissions, bad URL scheme, no credentials
        raise CheckpointError(
            f"cannot read checkpoint {safe_url(url)}: {describe_error(err)}"
        ) from None


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


def checkpoint_metadata(url: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors checkpoint, reading only its header.

    Returns {} for any other file (a ``.pth`` state_dict) or a header that is not JSON;
    raises :class:`CheckpointError` if ``url`` cannot be opened.
    """
    with _open_checkpoint(url) as f:
        head = f.read(8)
        if len(head) < 8 or head.startswith(b"PK"):  # a .pth file is a zip archive
            return {}
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            return {}
        header = f.read(size)
    try:
        meta = json.loads(header).get("__metadata__")
    except (ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def trained_window(metadata: dict[str, str]) -> int:
    """The sliding-window size (px) for a checkpoint with safetensors ``metadata``.

    A model sees whole windows at inference and whole crops in training; windows the size
    of its training crops keep the two alike (the bundled model, trained on 256-px crops,
    scores higher with 256-px windows than with 512: model card). So: the crop size that
    mediar_ray training stores (``training.config.augment.crop``) when it is a valid
    window size, else :data:`DEFAULT_ROI_SIZE` (MEDIAR's 512).
    """
    try:
        crop = json.loads(metadata.get("training", "{}"))["config"]["augment"]["crop"]
    except (ValueError, KeyError, TypeError):
        return DEFAULT_ROI_SIZE
    ok = isinstance(crop, int) and 32 <= crop <= 4096 and crop % 32 == 0
    return crop if ok else DEFAULT_ROI_SIZE


def common_window(sizes: Iterable[int]) -> int:
    """The one window size of an ensemble's members (:data:`DEFAULT_ROI_SIZE` if none).

    Raises
    ------
    CheckpointError
        The members were trained for different sizes (the message asks for
        ``--roi-size``).
    """
    found = set(sizes)
    if len(found) > 1:
        raise CheckpointError(
            f"the models were trained for different window sizes ({sorted(found)} px): "
            "pass --roi-size to choose one sliding-window size for all of them"
        )
    return found.pop() if found else DEFAULT_ROI_SIZE


def window_size(weights: Sequence[str]) -> int:
    """The sliding-window size (px) to run ``weights`` (an ensemble) with by default:
    :func:`trained_window` of each, read from the checkpoints' headers only (the slide
    driver decides it without loading a model).

    Raises
    ------
    CheckpointError
        A checkpoint cannot be read, or :func:`common_window` finds different sizes.
    """
    return common_window(trained_window(checkpoint_metadata(url)) for url in weights)


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
    from mediar_ray.io import describe_error, safe_url

    try:
        with fsspec.open(url, "r") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"--model-config {safe_url(url)}: file not found") from None
    except Exception as err:  # bad URL scheme, no access, no credentials, not text
        raise ValueError(
            f"--model-config {safe_url(url)}: cannot read ({describe_error(err)})"
        ) from None
