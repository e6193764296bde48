"""One optimiser step, as the Ray Train workers and the plain-loop benchmark run it:
float32 and bfloat16 autocast on batches made from real pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_loop import TINY_MODEL  # the DDP test's model

from mediar_ray.data.mapping import Pair
from mediar_ray.model import build_model
from mediar_ray.train.config import AugmentSection
from mediar_ray.train.loop import train_step
from mediar_ray.train.stream import BatchMaker

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def batch(data_dir: Path) -> dict[str, torch.Tensor]:
    """Four augmented 64-px samples of real DSB2018 pairs, as the loader makes them."""
    pairs = []
    for lab in sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff"))[:4]:
        stem = lab.name[: -len("_label.tiff")]
        image = next((data_dir / "dsb2018" / "images").glob(stem + ".*"))
        pairs.append(Pair(str(image), str(lab), "dsb2018"))
    maker = BatchMaker(pairs, [], AugmentSection.from_dict({"crop": 64}))
    made = maker.make([["main", i] for i in range(4)], seed=5)
    assert len(json.loads(str(made["ids"]))) == 4
    assert made["cell"].sum() > 0  # crops with cells in them
    return {k: torch.from_numpy(made[k]) for k in ("image", "flows", "cell", "valid")}


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(**TINY_MODEL).train()
    return model, torch.optim.AdamW(model.parameters(), lr=2e-3)


def _output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def test_bf16_step_runs_forward_in_bf16_and_keeps_float32_weights(batch) -> None:
    model, optimizer = _model_and_optimizer()
    dtypes = _output_dtypes(model)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [train_step(model, optimizer, batch, amp=True) for _ in range(8)]
    assert dtypes == [torch.bfloat16] * 8  # autocast was on for the forward pass
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert losses[-1] < 0.8 * losses[0]  # it learns this batch


def test_bf16_and_float32_steps_agree_on_the_loss(batch) -> None:
    full, opt_full = _model_and_optimizer()
    half, opt_half = _model_and_optimizer()
    dtypes = _output_dtypes(full)
    torch.manual_seed(7)  # the same drop-path draws in both forward passes
    first_full = train_step(full, opt_full, batch, amp=False)
    torch.manual_seed(7)
    first_half = train_step(half, opt_half, batch, amp=True)
    assert dtypes == [torch.float32]
    # same weights, same batch: bfloat16's 8-bit mantissa moves the loss by well under 5%
    assert first_half == pytest.approx(first_full, rel=0.05)
    assert first_half != first_full


def test_loss_is_mediars_with_unit_weights_and_a_weighted_mean_otherwise(batch) -> None:
    """All-ones weights (or none) give MEDIAR's loss, torch's own BCE and MSE means;
    other weights give each term's weighted mean over the pixels."""
    import torch.nn.functional as F

    from mediar_ray.train.loss import FLOW_SCALE, mediar_loss

    model, _ = _model_and_optimizer()
    with torch.no_grad():
        out = model(batch["image"])
    flows, cell = batch["flows"], batch["cell"]
    plain = F.binary_cross_entropy_with_logits(out[:, 2], cell) + 0.5 * F.mse_loss(
        out[:, :2], FLOW_SCALE * flows
    )
    assert float(mediar_loss(out, flows, cell)) == pytest.approx(float(plain), rel=1e-5)
    assert float(mediar_loss(out, flows, cell, torch.ones_like(cell))) == pytest.approx(
        float(plain), rel=1e-5
    )
    weights = torch.rand_like(cell) * 3 + 0.5
    bce = F.binary_cross_entropy_with_logits(out[:, 2], cell, reduction="none")
    mse = ((out[:, :2] - FLOW_SCALE * flows) ** 2).mean(dim=1)
    expected = ((bce * weights).sum() + 0.5 * (mse * weights).sum()) / weights.sum()
    assert float(mediar_loss(out, flows, cell, weights)) == pytest.approx(float(expected), rel=1e-5)
