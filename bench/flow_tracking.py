"""Flow dynamics against cellpose 4.2.1.1 on mosaics of real labels, measured in one run.

For mosaics of about 1, 4 and 16 megapixels built from the densest real label images in
../shared/data, the "network output" is what a perfect network would give (flows of the
true labels x 5, logit +-5). Each measurement runs in a fresh process (so peak memory is
its own) after a warm-up on a small image (numba compiles once per machine; cellpose
warms its torch kernels), and is the best of the same number of calls on both sides
(``--calls``, default 3: the sub-second 1-MP times are not one noisy sample, and neither
side gets more tries than the other; runs before issue 41 stopped after 20 s, so
cellpose's slow calls ran once):

* flows -> labels: ``mediar_ray.dynamics.flows_to_labels`` vs
  ``cellpose.dynamics.compute_masks`` (flow threshold 0.4, 200 steps, both defaults);
* labels -> flows: ``mediar_ray.dynamics.labels_to_flows`` vs
  ``cellpose.dynamics.masks_to_flows_gpu`` on the CPU.

Printed: seconds, seconds per megapixel, speed ratio, F1 at IoU 0.5 between the two
outputs and against the true labels, and peak resident memory per pixel.

    pip install -e ".[bench]" && python bench/flow_tracking.py [--sizes 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaic import mosaic, real_labels  # noqa: E402

#: Timed calls per measurement, the same for both sides (set by --calls).
CALLS = 3


def densest(k: int = 40) -> list[np.ndarray]:
    labels = real_labels(("dsb2018", "stardist_nuclei"))
    labels.sort(key=lambda lab: len(np.unique(lab)) / lab.size, reverse=True)
    return labels[:k]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _run(task: str, path: str, result_path: str) -> None:
    """In a fresh process: load the input, warm up, time the best of ``CALLS`` calls,
    report peak memory."""
    import torch

    torch.set_num_threads(2)
    data = np.load(path)
    if task.startswith("ours"):
        from mediar_ray.dynamics import flows_to_labels, labels_to_flows

        f2l = lambda raw: flows_to_labels(raw)  # noqa: E731
        l2f = labels_to_flows
    else:
        from cellpose import dynamics

        cpu = torch.device("cpu")

        def f2l(raw):
            return dynamics.compute_masks(
                raw[:2], raw[2], niter=200, cellprob_threshold=0.0, flow_threshold=0.4, device=cpu
            )

        l2f = lambda lab: dynamics.masks_to_flows_gpu(lab, device=cpu)  # noqa: E731
    fn = f2l if task.endswith("f2l") else l2f
    small = data[..., :256, :256]
    if task.endswith("l2f"):  # cellpose wants consecutive ids
        from mediar_ray.dynamics.heat import renumber

        small, arg = renumber(small)[0], renumber(data)[0]
    else:
        arg = data
    fn(small)
    base = _rss_bytes()
    times: list[float] = []
    while len(times) < CALLS:
        start = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if isinstance(out, tuple):
        out = out[0]
    if task.endswith("l2f"):
        out = np.asarray(out, np.float32)
    np.savez(result_path, seconds=seconds, memory=max(peak - base, 0), out=np.asarray(out))


def measure(task: str, array: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Run one measurement in a fresh Python process (its own peak memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/in.npy", array)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--calls",
                str(CALLS),
                "--child",
                task,
                f"{tmp}/in.npy",
                f"{tmp}/out.npz",
            ],
            check=True,
        )
        r = np.load(f"{tmp}/out.npz")
        return float(r["seconds"]), float(r["memory"]), r["out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument(
        "--calls",
        type=int,
        default=3,
        help="timed calls per measurement, the best counted (both sides)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CALLS
    CALLS = args.calls
    if args.child:
        _run(*args.child)
        return
    print(f"best of {CALLS} timed calls per measurement, ours and cellpose alike")
    from mediar_ray.dynamics import labels_to_flows
    from mediar_ray.metrics import match_counts

    labels = densest()
    rows_f2l, rows_l2f = [], []
    for size in args.sizes:
        truth = mosaic(labels, size, seed=0)
        n_cells = len(np.unique(truth)) - 1
        flows = labels_to_flows(truth)
        raw = np.concatenate([flows * 5, np.where(truth > 0, 5.0, -5.0)[None]]).astype(np.float32)
        mp_ = truth.size / 1e6
        t_ours, m_ours, ours = measure("ours_f2l", raw)
        t_cp, m_cp, theirs = measure("cellpose_f2l", raw)
        rows_f2l.append(
            (
                size,
                mp_,
                n_cells,
                t_ours,
                t_cp,
                t_cp / t_ours,
                match_counts(theirs, ours).f1,
                match_counts(truth, ours).f1,
                match_counts(truth, theirs).f1,
                m_ours / truth.size,
                m_cp / truth.size,
            )
        )
        t_ours, m_ours, f_ours = measure("ours_l2f", truth)
        t_cp, m_cp, f_cp = measure("cellpose_l2f", truth)
        err = np.linalg.norm(f_ours - f_cp) / max(np.linalg.norm(f_cp), 1e-12)
        rows_l2f.append(
            (
                size,
                mp_,
                n_cells,
                t_ours,
                t_cp,
                t_cp / t_ours,
                err,
                m_ours / truth.size,
                m_cp / truth.size,
            )
        )
        print(f"done {size}x{size}", file=sys.stderr, flush=True)

    print(
        "flows -> labels (ours: mediar_ray.dynamics.flows_to_labels; cellpose 4.2.1.1 "
        "compute_masks, flow threshold 0.4)"
    )
    print(
        "| size | MP | cells | ours s | ours s/MP | cellpose s | speed-up | F1 ours vs cellpose"
        " | F1 ours vs truth | F1 cellpose vs truth | ours B/px | cellpose B/px |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_f2l:
        print(
            f"| {r[0]}^2 | {r[1]:.1f} | {r[2]} | {r[3]:.2f} | {r[3] / r[1]:.3f} | {r[4]:.1f} "
            f"| {r[5]:.1f}x | {r[6]:.4f} | {r[7]:.4f} | {r[8]:.4f} | {r[9]:.0f} | {r[10]:.0f} |"
        )
    per_mp = [r[3] / r[1] for r in rows_f2l]
    print(f"time per MP at the largest size / at the smallest: {per_mp[-1] / per_mp[0]:.2f}")
    print()
    print("labels -> flows (ours: labels_to_flows; cellpose 4.2.1.1 masks_to_flows_gpu on CPU)")
    print(
        "| size | MP | cells | ours s | cellpose s | speed-up | rel. L2 ours vs cellpose"
        " | ours B/px | cellpose B/px |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_l2f:
        print(
            f"| {r[0]}^2 | {r[1]:.1f} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.1f}x "
            f"| {r[6]:.2e} | {r[7]:.0f} | {r[8]:.0f} |"
        )


if __name__ == "__main__":
    main()
