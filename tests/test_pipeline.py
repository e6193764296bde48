"""Whole-slide pipeline on Ray against the single-image path, on real images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from mediar_ray.dynamics import flows_to_labels, labels_to_flows
from mediar_ray.inference import predict_raw
from mediar_ray.io import read_image
from mediar_ray.metrics import match_counts
from mediar_ray.model import load_model
from mediar_ray.pipeline import SlideOptions, run_slides
from mediar_ray.pipeline.layout import tile_grid
from mediar_ray.pipeline.plan import plan_slide
from mediar_ray.pipeline.run import check_weights, slide_fingerprint
from mediar_ray.pipeline.stages import (
    gather_tile,
    infer_partial,
    mark_done,
    open_array,
    tiles_to_infer,
)
from mediar_ray.preprocess import normalize
from mediar_ray.segment import load_models, resolve_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mosaic import mosaic, real_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def plan_as_job(image: Path, out: Path, opts: SlideOptions):
    """Plan a slide exactly as the job would (same fingerprint), so that a following
    run_slides reuses what the test puts into its scratch."""
    resolved, hashes = check_weights(opts)
    fp = slide_fingerprint(str(image), resolved, hashes, opts.mpp)
    return plan_slide(str(image), image.name.split(".")[0], str(out), resolved, fp, opts.mpp).plan


def infer_in_process(plan, opts: SlideOptions) -> None:
    """Stage 2 without Ray: the functions the model actors and gather tasks run."""
    models = load_models(opts.weights, opts.model_config, "cpu")
    for tile in tile_grid(plan.shape, plan.tile):
        infer_partial(plan, tile, models, opts.tta, "cpu", precision=opts.precision)
    for tile in tile_grid(plan.shape, plan.tile):
        gather_tile(plan, tile)


def labels_of(out: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / f"{name}.zarr/labels/cells/0"), mode="r")[:])


def cells_across_borders(labels: np.ndarray, tile: int) -> int:
    """Number of cells with pixels on both sides of an internal tile border."""
    crossing = set()
    for k in range(tile, labels.shape[1], tile):
        a, b = labels[:, k - 1], labels[:, k]
        crossing |= set(a[(a == b) & (a > 0)].tolist())
    for k in range(tile, labels.shape[0], tile):
        a, b = labels[k - 1], labels[k]
        crossing |= set(a[(a == b) & (a > 0)].tolist())
    return len(crossing)


def test_mosaic_with_injected_flows_equals_whole_image(local_ray, tiny, tmp_path):
    """3072^2 mosaic of real labels, 512-px tiles: 36 tiles, many seams."""
    dense = real_labels(("dsb2018", "stardist_nuclei"))
    dense.sort(key=lambda lab: len(np.unique(lab)) / lab.size, reverse=True)
    truth = mosaic(dense[:40], 3072, seed=5)
    raw = np.concatenate([labels_to_flows(truth) * 5, np.where(truth > 0, 5.0, -5.0)[None]]).astype(
        np.float32
    )
    reference = flows_to_labels(raw)
    image = tmp_path / "mosaic.tif"
    tifffile.imwrite(image, (truth > 0).astype(np.uint8) * 200, tile=(256, 256))
    out = tmp_path / "out"
    opts = SlideOptions(weights=[tiny[0]], model_config=tiny[1], tile_size=512, halo=128)
    plan = plan_as_job(image, out, opts)
    flows = open_array(plan.layout.scratch + "/flows", mode="r+")
    for tile in tile_grid(plan.shape, plan.tile):  # stage 2 replaced by the true flows
        flows[:, tile.y0 : tile.y1, tile.x0 : tile.x1] = raw[
            :, tile.y0 : tile.y1, tile.x0 : tile.x1
        ]
        mark_done(plan, "infer", tile)
    report = run_slides([str(image)], str(out), opts)
    assert report["failed"] == {} and report["done"]["mosaic"]["tiles_inferred"] == 0
    labels = labels_of(out, "mosaic")
    n_ref, n_out = int(reference.max()), int(labels.max())
    assert n_ref > 5000
    assert abs(n_out - n_ref) <= 0.001 * n_ref
    assert match_counts(reference, labels).f1 >= 0.999
    # every id is one cell: ids are exactly 1..N
    assert np.array_equal(np.unique(labels), np.arange(n_out + 1))
    # cells are not cut at tile borders: as many cross them as in the whole-image result
    assert cells_across_borders(labels, 512) == cells_across_borders(reference, 512) > 200
    summary = json.loads((out / "mosaic.zarr/summary.json").read_text())
    assert summary["cells"] == n_out and (out / "mosaic.zarr/.mediar_complete").exists()
    areas = np.bincount(labels.ravel())[1:]
    assert summary["area_px"]["min"] == areas.min() > 0
    assert summary["area_px"]["max"] == areas.max()
    assert summary["area_px"]["mean"] == pytest.approx(areas.mean())
    assert not (out / "mosaic.zarr/.scratch").exists()


@pytest.mark.slow  # about 2 min on 2 cores
def test_svs_flows_and_labels_equal_whole_image_inference(local_ray, data_dir, tmp_path):
    # The bundled trained model, so the slide has many cells (nuclei) to cut at seams.
    svs = str(data_dir / "slides/CMU-1-Small-Region.svs")
    models = load_models(resolve_weights(None), {}, "cpu")
    # Tiles against the whole image: an identity of float32 sums, so both in fp32 (bf16's
    # outputs can change with the batch a window is in).
    whole = predict_raw(normalize(read_image(svs)), models, tta=False, precision="fp32")
    out = tmp_path / "out"
    # tissue off: every window runs, as in whole-image inference; the full image copied
    opts = SlideOptions(
        weights=resolve_weights(None),
        tta=False,
        tile_size=512,
        halo=128,
        workers=2,
        tissue="off",
        copy_image=True,
        precision="fp32",
    )
    plan = plan_as_job(Path(svs), out, opts)
    assert len(tile_grid(plan.shape, plan.tile)) == 30
    infer_in_process(plan, opts)
    stitched = np.asarray(open_array(plan.layout.scratch + "/flows")[:])
    assert np.linalg.norm(stitched - whole) / np.linalg.norm(whole) < 1e-4
    report = run_slides([svs], str(out), opts)
    assert report["done"]["CMU-1-Small-Region"]["tiles_inferred"] == 0  # the scratch reused
    labels = labels_of(out, "CMU-1-Small-Region")
    reference = flows_to_labels(whole)
    assert reference.max() >= 50  # 118 objects (10 across the 512-px seams) with the bundled model
    assert abs(int(labels.max()) - int(reference.max())) <= 0.001 * max(reference.max(), 1)
    assert match_counts(reference, labels).f1 >= 0.999
    assert cells_across_borders(labels, 512) == cells_across_borders(reference, 512) > 0
    image = zarr.open_array(str(out / "CMU-1-Small-Region.zarr/0"), mode="r")
    assert image.shape == (3, 2967, 2220)
    np.testing.assert_array_equal(
        np.moveaxis(image[:, :300, :300], 0, -1), read_image(svs)[:300, :300]
    )
    # Levels halve until the slide fits one 512-px tile: 2967 -> 1484 -> 742 -> 371.
    attrs = zarr.open_group(str(out / "CMU-1-Small-Region.zarr/labels/cells"), mode="r").attrs
    assert "image-label" in attrs["ome"] and len(attrs["ome"]["multiscales"][0]["datasets"]) == 4
    assert (out / "CMU-1-Small-Region.zarr/qc.png").stat().st_size > 1000


@pytest.mark.slow  # 1-2 min on 2 cores
def test_rerun_of_inference_redoes_only_missing_tiles(local_ray, tiny, data_dir, tmp_path):
    """Partials are per tile and whole chunks: a rerun after a lost partial and a lost
    flows chunk recomputes just the partial that chunk needs, and the labels equal those
    of a run without losses."""
    weights, params = tiny
    image = tmp_path / "phase.tif"
    tifffile.imwrite(
        image, read_image(str(data_dir / "usiigaci_phase/images/train_set4.tif"))[:600, :700]
    )
    opts = SlideOptions(
        weights=[weights],
        model_config=params,
        tta=True,
        roi_size=256,
        tile_size=256,
        workers=1,
        precision="fp32",
    )
    plan = plan_as_job(image, tmp_path / "out", opts)
    assert len(tile_grid(plan.shape, plan.tile)) == 9
    infer_in_process(plan, opts)
    flows = open_array(plan.layout.scratch + "/flows", mode="r+")
    first = np.asarray(flows[:])
    whole = predict_raw(
        normalize(read_image(str(image))),
        load_model(weights, **params),
        tta=True,
        roi_size=256,
        precision="fp32",
    )
    assert np.linalg.norm(first - whole) / np.linalg.norm(whole) < 1e-5
    done = Path(plan.layout.scratch) / "done"
    assert len(list((done / "windows").iterdir())) == 9
    # Lose tile 1_1's flows (chunk zeroed, record gone) and the partial of its upper-left
    # neighbour 0_0, as if both workers had been killed mid-write.
    (done / "infer/1_1").unlink()
    (done / "windows/0_0").unlink()
    flows[:, 256:512, 256:512] = np.zeros((3, 256, 256), np.float32)
    assert [t.name for t in tiles_to_infer(plan)] == ["0_0"]
    report = run_slides([str(image)], str(tmp_path / "out"), opts)
    assert report["done"]["phase"]["tiles_inferred"] == 1
    clean = run_slides([str(image)], str(tmp_path / "clean"), opts)
    assert clean["done"]["phase"]["tiles_inferred"] == 9
    np.testing.assert_array_equal(
        labels_of(tmp_path / "out", "phase"), labels_of(tmp_path / "clean", "phase")
    )


def test_dask_reads_one_chunk_lazily(local_ray, tiny, tmp_path):
    truth = mosaic(real_labels(("stardist_nuclei",)), 1024, seed=0)
    image = tmp_path / "s.tif"
    tifffile.imwrite(image, (truth > 0).astype(np.uint8) * 200)
    out = tmp_path / "out"
    opts = SlideOptions(weights=[tiny[0]], model_config=tiny[1], tile_size=256)
    plan = plan_as_job(image, out, opts)
    raw = np.concatenate([labels_to_flows(truth) * 5, np.where(truth > 0, 5.0, -5.0)[None]])
    open_array(plan.layout.scratch + "/flows", mode="r+")[:] = raw.astype(np.float32)
    for tile in tile_grid(plan.shape, plan.tile):
        mark_done(plan, "infer", tile)
    run_slides([str(image)], str(out), opts)
    expected = labels_of(out, "s")
    # Corrupt every label chunk but one: a read that touched any other chunk would fail.
    chunks = sorted((out / "s.zarr/labels/cells/0/c").rglob("*"))
    chunks = [c for c in chunks if c.is_file()]
    keep = out / "s.zarr/labels/cells/0/c/1/2"
    assert keep in chunks and len(chunks) > 8
    for c in chunks:
        if c != keep:
            c.write_bytes(b"not a zstd frame")
    lazy = da.from_zarr(str(out / "s.zarr/labels/cells/0"))
    assert lazy.chunksize == (256, 256) and lazy.shape == (1024, 1024)
    block = lazy[256:512, 512:768].compute()
    with pytest.raises(Exception):  # noqa: B017 - whichever codec error zarr raises
        lazy[0:256, 0:256].compute()  # the corruption is real
    np.testing.assert_array_equal(block, expected[256:512, 512:768])
    assert block.any()


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a job started with ``start_new_session`` and every process of its session,
    and return when none is left. Killing its process group is not enough: Ray's
    processes run in a group of their own (its reaper's) and stop a moment after the
    driver, long enough for a stage task to finish a slide after the kill."""

    def session_pids() -> list[int]:  # live (not zombie) processes of the job's session
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            state, session = stat[0], int(stat[3])
            if session == proc.pid and state != "Z":
                pids.append(int(entry))
        return pids

    deadline = time.monotonic() + 60
    while pids := session_pids():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()  # reap the driver
        assert time.monotonic() < deadline, f"processes {pids} of the killed job survive"
        time.sleep(0.1)
    proc.wait()


@pytest.mark.slow  # 1-2 min on 2 cores
def test_killed_job_resumes_and_equals_an_uninterrupted_run(local_ray, tiny, data_dir, tmp_path):
    weights, params = tiny
    src = tmp_path / "in"
    src.mkdir()
    for name in ("train_set1", "train_set4"):
        image = read_image(str(data_dir / f"usiigaci_phase/images/{name}.tif"))
        tifffile.imwrite(src / f"{name}.tif", image[:512, :640])
    flags = [
        "--weights",
        weights,
        "--model-config",
        json.dumps(params),
        "--no-tta",
        "--roi-size",
        "256",
        "--tile-size",
        "256",
        "--halo",
        "64",
    ]
    job = [sys.executable, str(REPO / "jobs/segment_slides.py"), "--input", str(src)] + flags
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    # Each job starts its own local Ray: without an address, ray.init() joins the latest
    # cluster that `ray start` left in /tmp/ray, which on a shared machine is someone else's.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    subprocess.run(job + ["--output", str(ref_out)], check=True, capture_output=True, env=env)
    proc = subprocess.Popen(
        job + ["--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    # Kill while the second slide's tiles are being inferred (its partials half done).
    done_dir = out / "train_set4.zarr/.scratch/done/windows"
    deadline = time.monotonic() + 600
    while not (done_dir.exists() and len(list(done_dir.iterdir())) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    kill_session(proc)
    complete = [
        n for n in ("train_set1", "train_set4") if (out / f"{n}.zarr/.mediar_complete").exists()
    ]
    assert "train_set4" not in complete
    subprocess.run(job + ["--output", str(out)], check=True, capture_output=True, env=env)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["skipped"] == complete and summary["failed"] == {}
    assert summary["done"]["train_set4"]["tiles_inferred"] <= 4  # resumed, not redone
    for name in ("train_set1", "train_set4"):
        np.testing.assert_array_equal(labels_of(out, name), labels_of(ref_out, name))
