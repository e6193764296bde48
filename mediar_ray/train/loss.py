"""MEDIAR's training loss, with pixels that may be ignored (boundary exclusion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FLOW_SCALE", "mediar_loss"]

#: Network flows are trained against unit flows times this factor (MEDIAR: 5).
FLOW_SCALE = 5.0


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over pixels where ``valid`` is 1; 0 when none is."""
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


def mediar_loss(
    out: torch.Tensor,
    flows: torch.Tensor,
    cell: torch.Tensor,
    valid: torch.Tensor | None = None,
    flow_weight: float = 0.5,
) -> torch.Tensor:
    """BCE-with-logits on the cell channel + ``flow_weight`` x MSE of the flows.

    Parameters
    ----------
    out : (N, 3, H, W) float tensor
        Network output: dy, dx, cell logit.
    flows : (N, 2, H, W) float tensor
        Unit flow targets (dy, dx); the network is trained against ``FLOW_SCALE`` times them.
    cell : (N, H, W) float tensor
        1 inside cells, 0 in the background.
    valid : (N, H, W) float tensor, optional
        Per-pixel weight >= 0: 1 where a pixel counts, 0 where it is ignored (cell
        borders under boundary exclusion), more where it counts more
        (:func:`mediar_ray.data.transforms.pixel_weights`). All pixels weigh 1 when omitted.
    flow_weight : float
        Weight of the flow term (MEDIAR: 0.5).

    Returns
    -------
    Scalar tensor. Each term is a mean over the pixels weighted by ``valid`` (and, for
    the flows, over both channels), so with ``valid`` all ones this is MEDIAR's loss
    exactly.
    """
    if valid is None:
        valid = torch.ones_like(cell)
    bce = F.binary_cross_entropy_with_logits(out[:, 2], cell, reduction="none")
    mse = ((out[:, :2] - FLOW_SCALE * flows) ** 2).mean(dim=1)
    return _masked_mean(bce, valid) + flow_weight * _masked_mean(mse, valid)
