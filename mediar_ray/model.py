"""MEDIAR-Former: the network, and reading/writing its checkpoints.

The network is segmentation_models_pytorch's ``MAnet`` with a Mix Transformer encoder,
every ReLU of encoder and decoder replaced by Mish, the default segmentation head removed
and two heads on the last decoder map (``gradflow_head``: dy, dx; ``cellprob_head``: the
cell logit). Its output is ``cat([gradflow, cellprob])``: channel 0 is dy, 1 is dx, 2 is
the cell logit.

Checkpoints come in two kinds:

* the original MEDIAR ``.pth`` files: plain state_dicts, loaded with
  ``torch.load(weights_only=True)`` and strict key/shape checking; the model parameters
  (encoder, decoder channels) are given by the caller;
* our own ``.safetensors`` files: weights plus the model parameters as JSON in the
  safetensors metadata (and optionally a ``<file>.json`` beside the checkpoint).

Any fsspec URL (local path, ``s3://``, ``gs://``, ``memory://``, ``https://``) may be
given for a checkpoint.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Mapping

import fsspec
import segmentation_models_pytorch as smp
import torch
from torch import nn

from mediar_ray.weights import (
    CheckpointError,
    default_weights,
    read_checkpoint_bytes,
    trained_window,
)

__all__ = [
    "DEFAULT_MODEL_PARAMS",
    "CheckpointError",
    "MEDIARFormer",
    "build_model",
    "default_weights",
    "load_model",
    "load_state_dict",
    "model_params",
    "save_model",
]

#: Parameters of the released MEDIAR-Former (mit_b5).
DEFAULT_MODEL_PARAMS: dict[str, Any] = {
    "encoder_name": "mit_b5",
    "decoder_channels": [1024, 512, 256, 128, 64],
    "decoder_pab_channels": 256,
    "in_channels": 3,
    "classes": 3,
}

_METADATA_KEY = "mediar_ray_model_params"


class _FlowHead(nn.Sequential):
    """conv3x3(c -> c/2), Mish, BatchNorm(c/2), conv3x3(c/2 -> out).

    The module indices (0, 2, 3 carry weights) are those of the original checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        mid = in_channels // 2
        super().__init__(
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1),
            nn.Mish(inplace=True),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1),
        )


def _relu_to_mish(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Mish(inplace=True))
        else:
            _relu_to_mish(child)


class MEDIARFormer(smp.MAnet):
    """MEDIAR-Former (Lee et al., 2022): MAnet + Mix Transformer encoder + flow heads.

    Parameters
    ----------
    encoder_name : str
        A Mix Transformer encoder of segmentation_models_pytorch (``mit_b0`` .. ``mit_b5``).
    encoder_weights : str or None
        Pretrained encoder weights; ``None`` (the default) never downloads anything.
    decoder_channels : sequence of 5 int
    decoder_pab_channels : int
    in_channels, classes : int
        3 and 3 for MEDIAR (``classes`` only sizes the unused MAnet head).

    Input (N, 3, H, W) float32 with H and W multiples of 32; output (N, 3, H, W) float32:
    dy, dx (flows scaled by 5, as trained) and the cell logit.
    """

    def __init__(
        self,
        encoder_name: str = "mit_b5",
        encoder_weights: str | None = None,
        decoder_channels: tuple[int, ...] | list[int] = (1024, 512, 256, 128, 64),
        decoder_pab_channels: int = 256,
        in_channels: int = 3,
        classes: int = 3,
    ) -> None:
        super().__init__(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            decoder_channels=tuple(decoder_channels),
            decoder_pab_channels=decoder_pab_channels,
            in_channels=in_channels,
            classes=classes,
        )
        self.segmentation_head = None
        _relu_to_mish(self.encoder)
        _relu_to_mish(self.decoder)
        self.cellprob_head = _FlowHead(decoder_channels[-1], 1)
        self.gradflow_head = _FlowHead(decoder_channels[-1], 2)
        self.mediar_params = {
            "encoder_name": encoder_name,
            "decoder_channels": [int(c) for c in decoder_channels],
            "decoder_pab_channels": int(decoder_pab_channels),
            "in_channels": int(in_channels),
            "classes": int(classes),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x)
        decoded = self.decoder(self.encoder(x))
        return torch.cat([self.gradflow_head(decoded), self.cellprob_head(decoded)], dim=1)


def build_model(**params: Any) -> MEDIARFormer:
    """Build a MEDIARFormer from ``DEFAULT_MODEL_PARAMS`` updated with ``params``."""
    unknown = set(params) - set(DEFAULT_MODEL_PARAMS) - {"encoder_weights"}
    if unknown:
        raise ValueError(
            f"unknown model parameter(s) {sorted(unknown)}; allowed: {sorted(DEFAULT_MODEL_PARAMS)}"
        )
    merged = {**DEFAULT_MODEL_PARAMS, **params}
    _check_params(merged)
    return MEDIARFormer(**merged)


def _check_params(params: Mapping[str, Any]) -> None:
    """One-line errors for model parameters the network cannot be built from (smp's own
    messages are a KeyError with every encoder it knows, or a shape error deep inside)."""
    name = params["encoder_name"]
    known = smp.encoders.get_encoder_names()
    if name not in known:
        mits = ", ".join(n for n in known if n.startswith("mit_"))
        raise ValueError(
            f"unknown encoder_name {name!r} in the model parameters (--model-config or the "
            f"checkpoint's): MEDIAR-Former uses a Mix Transformer ({mits}; the released "
            "MEDIAR models: mit_b5)"
        )
    channels = params["decoder_channels"]
    if (
        not isinstance(channels, (list, tuple))
        or len(channels) != 5
        or not all(isinstance(c, int) and c >= 2 for c in channels)
    ):
        raise ValueError(
            f"decoder_channels = {channels!r} in the model parameters: expected 5 integers "
            "of at least 2 (MEDIAR: [1024, 512, 256, 128, 64])"
        )
    pab = params["decoder_pab_channels"]
    if not isinstance(pab, int) or pab < 1:
        raise ValueError(
            f"decoder_pab_channels = {pab!r} in the model parameters: expected "
            "a positive integer (MEDIAR: 256)"
        )


def model_params(model: MEDIARFormer) -> dict[str, Any]:
    """The parameters that rebuild ``model`` with :func:`build_model`."""
    return dict(model.mediar_params)


# --------------------------------------------------------------------------- reading


def _is_safetensors(url: str, data: bytes) -> bool:
    return url.endswith(".safetensors") or (
        len(data) > 8 and data[8:9] == b"{" and not data.startswith(b"PK")
    )


def _safetensors_metadata(data: bytes, url: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length,
    then a JSON header)."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except Exception as err:
        raise CheckpointError(f"{url} is not a valid safetensors file: {err}") from err
    return header.get("__metadata__", {}) or {}


def _read_checkpoint(
    url: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """Tensors of a checkpoint, the model parameters stored with it and its safetensors
    metadata (both may be empty)."""
    data = read_checkpoint_bytes(url)
    if not data:
        raise CheckpointError(f"checkpoint {url} is empty")
    if _is_safetensors(url, data):
        from safetensors.torch import load as st_load

        meta = _safetensors_metadata(data, url)
        try:
            tensors = st_load(data)
        except Exception as err:
            raise CheckpointError(
                f"{url} is truncated or corrupt ({err}); download it again"
            ) from err
        params = json.loads(meta[_METADATA_KEY]) if _METADATA_KEY in meta else {}
        return tensors, params, meta
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load {url} as a PyTorch state_dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); the file is truncated, "
            "corrupt, or holds more than plain tensors"
        ) from None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{url} does not hold a state_dict of tensors")
    return dict(obj), {}, {}


def _sidecar_params(url: str) -> dict[str, Any]:
    """Model parameters from ``<checkpoint>.json`` beside the checkpoint, if present."""
    try:
        with fsspec.open(url + ".json", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except Exception:
        return {}


def _few(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items, and how many more there are."""
    shown = str(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, naming every key that does not fit.

    Raises
    ------
    CheckpointError
        Missing keys, unexpected keys or shape mismatches, all listed.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit MEDIARFormer({model_params(model)}): "
            + "; ".join(problems)
            + ". Check --model-config (encoder, decoder channels) for this checkpoint."
        )
    model.load_state_dict(state, strict=True)


def load_model(path_or_url: str, device: str | torch.device = "cpu", **params: Any) -> MEDIARFormer:
    """Build a MEDIARFormer and load a checkpoint into it, strictly.

    Parameters
    ----------
    path_or_url : str
        ``.pth`` state_dict (original MEDIAR) or ``.safetensors`` (mediar_ray), any
        fsspec URL.
    device : str or torch.device
    **params
        Model parameters (see :func:`build_model`). They override those stored with the
        checkpoint (safetensors metadata or ``<checkpoint>.json``), which override the
        released-model defaults.

    Returns
    -------
    MEDIARFormer in eval mode on ``device``, with ``roi_size``: the sliding-window size
    (px) it was trained for (:func:`mediar_ray.weights.trained_window`).
    """
    tensors, stored, meta = _read_checkpoint(str(path_or_url))
    stored = stored or _sidecar_params(str(path_or_url))
    model = build_model(**{**stored, **params})
    load_state_dict(model, tensors, str(path_or_url))
    model.roi_size = trained_window(meta)
    return model.to(device).eval()


def save_model(
    model: MEDIARFormer,
    path_or_url: str,
    params: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as safetensors with its parameters (and ``metadata``) inside.

    ``metadata`` values are stored as JSON strings under their keys.
    """
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {_METADATA_KEY: json.dumps(dict(params or model_params(model)))}
    for key, value in (metadata or {}).items():
        meta[str(key)] = json.dumps(value)
    blob = st_save(tensors, metadata=meta)
    with fsspec.open(str(path_or_url), "wb") as f:
        f.write(blob)
