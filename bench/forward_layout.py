"""Memory layout of the bundled model's activations: channels-last against the default
(contiguous NCHW) layout, measured in one run on the same weights and inputs.

(a) Inference: seconds per 512-px window (batch 1, as a 512-px image's TTA frame runs),
    on one torch thread (a model actor of ``segment-slides``) and on two (``segment`` on
    this machine), through :func:`mediar_ray.inference._forward` for channels-last and
    the bare module call for the default layout.
(b) Training: seconds per step of the cpu_small recipe (batch 8 of 256-px crops,
    bfloat16 autocast, AdamW; :func:`mediar_ray.train.loop.train_step`) on one thread
    (one Ray Train worker of ``configs/cpu_small.yaml``).

Ratios are default / channels-last (above 1: channels-last is faster). Each figure is the
fastest of ``--repeats`` timed runs after an untimed warm-up.

    pip install -e ".[bench]" && python bench/forward_layout.py
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fastest(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def inference(threads: int, repeats: int) -> dict[str, float]:
    import torch

    from mediar_ray.inference import _forward
    from mediar_ray.segment import load_models

    torch.set_num_threads(threads)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    model = load_models(None, None, "cpu")[0].eval()  # the bundled model, default layout

    def default() -> None:
        with torch.inference_mode():
            model(x)

    plain = fastest(default, repeats)
    model = model.to(memory_format=torch.channels_last)
    last = fastest(lambda: _forward(model, x, torch.device("cpu"), False), repeats)
    return {
        "default_s": round(plain, 4),
        "channels_last_s": round(last, 4),
        "ratio": round(plain / last, 3),
    }


def training(repeats: int) -> dict[str, float]:
    import torch

    from mediar_ray.model import build_model
    from mediar_ray.train.config import load_config
    from mediar_ray.train.loop import train_step

    torch.set_num_threads(1)
    cfg = load_config(str(REPO / "configs" / "cpu_small.yaml"))
    params = {k: v for k, v in cfg.model.to_dict().items() if k != "init"}
    g = torch.Generator().manual_seed(0)
    b, s = cfg.optim.batch_size, cfg.augment.crop
    batch = {
        "image": torch.randn(b, 3, s, s, generator=g),
        "flows": torch.randn(b, 2, s, s, generator=g),
        "cell": (torch.rand(b, s, s, generator=g) > 0.5).float(),
        "valid": torch.ones(b, s, s),
    }
    out = {}
    for name, fmt in (("default", torch.contiguous_format), ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        model = build_model(**params).train().to(memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
        step = {**batch, "image": batch["image"].contiguous(memory_format=fmt)}
        out[f"{name}_s"] = round(
            fastest(functools.partial(train_step, model, opt, step, amp=cfg.optim.amp), repeats),
            4,
        )
    out["ratio"] = round(out["default_s"] / out["channels_last_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {
        "inference_1_thread": inference(1, args.repeats),
        "inference_2_threads": inference(2, args.repeats),
        "training_step_1_thread": training(args.repeats),
    }
    for name, r in results.items():
        print(
            f"{name:24s} default {r['default_s']:.3f} s  channels-last "
            f"{r['channels_last_s']:.3f} s  default/channels-last {r['ratio']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
