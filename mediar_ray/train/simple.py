"""A single-process MEDIAR training loop (plain PyTorch), used for the bundled model.

Recipe (MEDIAR's, reduced to what fits 2 CPU cores): images normalised as at prediction
time; random 256x256 crops with flips and 90-degree rotations; targets computed after the
spatial transforms (unit flows x 5 from :func:`labels_to_flows`, cell = label > 0); loss =
BCE-with-logits on the cell channel + 0.5 x MSE on the flows; AdamW (weight decay 0.01)
with a cosine schedule.

    python -m mediar_ray.train.simple --out cpu_small.safetensors --minutes 25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mediar_ray.dynamics import flows_to_labels, labels_to_flows
from mediar_ray.inference import predict_raw
from mediar_ray.io import read_image
from mediar_ray.metrics import cellseg_f1
from mediar_ray.model import build_model, save_model
from mediar_ray.preprocess import normalize

CPU_SMALL = {"encoder_name": "mit_b0", "decoder_channels": [64, 32, 16, 16, 16],
             "decoder_pab_channels": 16}


def mediar_loss(out: torch.Tensor, flows: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """BCE on the logit (channel 2) + 0.5 x MSE of channels 0-1 against 5 x unit flows.

    out (N, 3, H, W); flows (N, 2, H, W) unit vectors; cell (N, H, W) float 0/1.
    """
    return F.binary_cross_entropy_with_logits(out[:, 2], cell) + 0.5 * F.mse_loss(
        out[:, :2], 5.0 * flows)


def split_pairs(root: Path, every: int = 5) -> tuple[list, list]:
    """(image, label) paths of every source; every ``every``-th pair (sorted) held out."""
    train, held = [], []
    for source in sorted(p for p in root.iterdir() if (p / "labels").is_dir()):
        labels = sorted((source / "labels").glob("*_label.tiff"))
        for i, lab in enumerate(labels):
            stem = lab.name[: -len("_label.tiff")]
            image = next((source / "images").glob(stem + ".*"))
            (held if i % every == every - 1 else train).append((image, lab, source.name))
    return train, held


def random_crop(image: np.ndarray, labels: np.ndarray, size: int, rng) -> tuple:
    """A random crop (padded with zeros if smaller), flipped and rotated at random."""
    h, w = labels.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
    labels = np.pad(labels, ((0, ph), (0, pw)))
    y = rng.integers(0, labels.shape[0] - size + 1)
    x = rng.integers(0, labels.shape[1] - size + 1)
    image, labels = image[:, y : y + size, x : x + size], labels[y : y + size, x : x + size]
    k = int(rng.integers(4))
    image, labels = np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k)
    if rng.random() < 0.5:
        image, labels = image[:, :, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def evaluate(model, pairs, roi_size: int = 256) -> dict[str, float]:
    """Mean CellSeg F1 per source on whole held-out images."""
    model.eval()
    scores: dict[str, list[float]] = {}
    for image_path, label_path, source in pairs:
        raw = predict_raw(normalize(read_image(str(image_path))), model, tta=False,
                          roi_size=roi_size, device="cpu")
        truth = read_image(str(label_path))
        scores.setdefault(source, []).append(cellseg_f1(truth, flows_to_labels(raw)).f1)
    model.train()
    return {s: float(np.mean(v)) for s, v in scores.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2].parent / "shared/data"))
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train, held = split_pairs(Path(args.data))
    data = [(normalize(read_image(str(i))), read_image(str(l))) for i, l, _ in train]
    model = build_model(**CPU_SMALL)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    budget = args.minutes * 60
    start, step, losses = time.time(), 0, []
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for group in opt.param_groups:  # cosine schedule over the time budget
            group["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * frac))
        batch = [random_crop(*data[int(rng.integers(len(data)))], args.crop, rng)
                 for _ in range(args.batch)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        flows = torch.from_numpy(np.stack([labels_to_flows(b[1]) for b in batch]))
        cell = torch.from_numpy(np.stack([(b[1] > 0).astype(np.float32) for b in batch]))
        loss = mediar_loss(model(x), flows, cell)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(losses[-50:]):.3f} "
                  f"{time.time() - start:.0f} s", flush=True)
    minutes = (time.time() - start) / 60
    scores = evaluate(model, held)
    card = {"steps": step, "train_minutes": round(minutes, 1), "train_pairs": len(train),
            "held_out_pairs": len(held), "held_out_f1": scores,
            "held_out_mean_f1": float(np.mean(list(scores.values()))),
            "config": vars(args) | {"model": CPU_SMALL}}
    save_model(model, args.out, metadata={"training": card})
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
