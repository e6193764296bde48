"""The slide job on Ray Data (issue 40): what Ray Data does not do for the job, done by it.

- a tile whose inference kills its model actor every time (Ray restarts the actor and
  retries the tile forever) fails its slide alone after a few attempts; the archive ends;
- the gate keeps at most ``--max-slides-in-flight`` slides planned and unfinished;
- the planning stage stays out of the model actors (no operator fusion);
- ``--workers`` takes N or MIN:MAX.
"""

from __future__ import annotations

import pytest
from PIL import Image
from test_archive import DEMO

from mediar_ray.io import read_image
from mediar_ray.pipeline import SlideOptions, run_slides
from mediar_ray.pipeline.engine import (
    KILL_SLIDE_ENV,
    MAX_TILE_ATTEMPTS,
    SlideGate,
    build_dataset,
    peak_overlap,
)
from mediar_ray.pipeline.options import OptionError


@pytest.fixture(autouse=True)
def ray_data_engine(monkeypatch):
    """These tests are of the Ray Data engine, not the default one."""
    monkeypatch.setenv("MEDIAR_ENGINE", "data")


def tiny_opts(**kw) -> SlideOptions:
    """One 64-px window per small slide, no tissue detection: the fastest real job."""
    return SlideOptions(
        tta=False, roi_size=64, tile_size=64, halo=16, tissue="off", cells=False, **kw
    )


@pytest.fixture(scope="module")
def fields() -> list:
    """Real 64 x 64 fields of fluorescence nuclei (the demo image), all different."""
    image = read_image(str(DEMO / "dsb_fluor_193ffaa5.png"))
    return [image[y : y + 64, x : x + 64] for y in range(0, 448, 64) for x in range(0, 384, 64)]


@pytest.mark.slow  # three restarts of the model actor: about 50 s on 2 CPUs
def test_a_tile_that_always_kills_its_actor_fails_its_slide_alone(
    local_ray, fields, tmp_path, monkeypatch
):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(("good", "deadly")):
        Image.fromarray(fields[i]).save(src / f"{name}.png")
    monkeypatch.setenv(KILL_SLIDE_ENV, "deadly")  # its tile ends the actor's process
    out = tmp_path / "out"
    report = run_slides([str(src)], str(out), tiny_opts(workers=1))
    assert list(report["done"]) == ["good"]
    assert list(report["failed"]) == ["deadly"]
    assert f"ended its model actor {MAX_TILE_ATTEMPTS} times" in report["failed"]["deadly"]
    assert (out / "good.zarr/.mediar_complete").exists()
    assert not (out / "deadly.zarr/.mediar_complete").exists()


@pytest.mark.slow
def test_forty_slides_never_more_than_four_in_flight(local_ray, fields, tmp_path):
    """40 small slides, --max-slides-in-flight 4: the gate never held more than 4 slides
    between planning and their end (its own record), and every slide completed."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        Image.fromarray(fields[i]).save(src / f"s{i:02d}.png")
    report = run_slides(
        [str(src)], str(tmp_path / "out"), tiny_opts(workers=1, max_slides_in_flight=4)
    )
    assert len(report["done"]) == 40 and report["failed"] == {}
    assert report["slides_in_flight_peak"] == 4
    assert report["pool"] == {"min": 1, "max": 1, "peak": 1}


def _optimized_physical_plan(ds, capsys) -> str:
    ds.explain()
    return capsys.readouterr().out.split("Physical Plan (Optimized)")[1]


def _plan_batches(batch: dict) -> dict:
    return batch


def test_planning_is_not_fused_into_the_model_actors(local_ray, capsys):
    import ray

    gate = ray.remote(SlideGate).remote(4)
    for cpus in (0.25, 0.75):  # 0.75: the same CPUs as a model actor
        opts = tiny_opts(workers="1:3", cpus_per_task=cpus)
        ds = build_dataset([("a.png", "a", None)], "/nowhere", opts, [], gate=gate, job="j")
        plan = _optimized_physical_plan(ds, capsys)
        assert "ActorPoolMapOperator[MapBatches(TileInferer)]" in plan
        assert "TaskPoolMapOperator[FlatMap(plan_rows)]" in plan
    # The check can fail: a plan stage written as a batch map with the actors'
    # resources is fused into them (planning would run inside the model actors).
    opts = tiny_opts(workers=1)
    ds = ray.data.from_items([{"spec": "[]"}]).map_batches(
        _plan_batches, num_cpus=opts.actor_cpus(), batch_size=1
    )
    ds = ds.map_batches(
        build_dataset.__globals__["TileInferer"],
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        batch_size=1,
        num_cpus=opts.actor_cpus(),
    )
    assert "MapBatches(_plan_batches)->MapBatches(TileInferer)" in _optimized_physical_plan(
        ds, capsys
    )
    ray.kill(gate)


def test_workers_fixed_or_elastic():
    assert (SlideOptions(workers=3).min_workers, SlideOptions(workers=3).max_workers) == (3, 3)
    opts = SlideOptions(workers="1:4")
    assert (opts.min_workers, opts.max_workers, opts.slides_in_flight()) == (1, 4, 12)
    for bad in ("0", "3:2", "a", "1:", ":2", 0):
        with pytest.raises(OptionError, match="--workers"):
            SlideOptions(workers=bad)


def test_peak_overlap():
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 4), (1, 2), (3, 5)]) == 2
    assert peak_overlap([(0, 1), (1, 2)]) == 1  # one ends as the next starts
