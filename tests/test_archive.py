"""The archive engine: many slides in one job, one pool of model actors.

Labels of an archive equal those of its slides run one at a time; an unreadable slide
among good ones fails alone (exit code 1); the run summary says what happened to each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from mediar_ray.io import read_image
from mediar_ray.pipeline import SlideOptions, run_slides
from mediar_ray.pipeline.utilization import all_busy_fraction, busy_fraction

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mediar_ray" / "assets" / "demo" / "images"


def small_opts(**kw) -> SlideOptions:
    """The bundled model on 256-px windows and tiles: several tiles per demo image."""
    return SlideOptions(tta=False, roi_size=256, tile_size=256, halo=64, **kw)


def labels_of(out: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / f"{name}.zarr/labels/cells/0"), mode="r")[:])


@pytest.fixture(scope="module")
def three_slides(data_dir, tmp_path_factory) -> Path:
    """Three real images as slides: a tiled TIFF (phase contrast), a PNG and an OME-TIFF."""
    src = tmp_path_factory.mktemp("three")
    phase = read_image(str(data_dir / "usiigaci_phase/images/train_set1.tif"))[:600, :520]
    tifffile.imwrite(src / "phase.tif", phase, tile=(128, 128))
    shutil.copy(DEMO / "dsb_tissue_f952cc65.png", src / "tissue.png")
    tifffile.imwrite(src / "nuclei.ome.tif", read_image(str(DEMO / "stardist_img2d.tif")), ome=True)
    return src


# slow: three slides each run alone and once more together (80-150 s); the default set
# keeps the engine's unreadable-slide test and test_ray_data_engine's.
@pytest.mark.slow
def test_archive_equals_slides_run_one_at_a_time(local_ray, three_slides, tmp_path):
    report = run_slides([str(three_slides)], str(tmp_path / "all"), small_opts(workers=2))
    assert report["failed"] == {} and sorted(report["done"]) == ["nuclei", "phase", "tissue"]
    assert (
        report["utilization"]["actors"] == 2
        and report["utilization"]["tiles"]
        == sum(d["tiles_inferred"] for d in report["done"].values())
        > 6
    )
    summary = json.loads((tmp_path / "all/run_summary.json").read_text())
    assert summary["inputs"]["phase"] == str(three_slides / "phase.tif")
    for path in sorted(three_slides.iterdir()):
        name = path.name.split(".")[0]
        alone = run_slides(
            [str(path)], str(tmp_path / name), small_opts(workers=1, max_slides_in_flight=1)
        )
        assert list(alone["done"]) == [name]
        together = labels_of(tmp_path / "all", name)
        np.testing.assert_array_equal(together, labels_of(tmp_path / name, name))
        assert together.max() > 5


def test_unreadable_slide_fails_alone(local_ray, three_slides, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(three_slides, src)
    (src / "broken.tif").write_bytes(b"II*\x00 truncated")
    out = tmp_path / "out"
    report = run_slides([str(src)], str(out), small_opts(workers=2))
    assert sorted(report["done"]) == ["nuclei", "phase", "tissue"]
    assert list(report["failed"]) == ["broken"] and "broken.tif" in report["failed"]["broken"]
    for name in report["done"]:
        assert (out / f"{name}.zarr/.mediar_complete").exists()
    assert not (out / "broken.zarr/.mediar_complete").exists()
    # a rerun skips the three complete slides and fails the broken one again
    again = run_slides([str(src)], str(out), small_opts(workers=2))
    assert sorted(again["skipped"]) == ["nuclei", "phase", "tissue"] and again["done"] == {}
    assert list(again["failed"]) == ["broken"]


def test_busy_fractions():
    assert busy_fraction([(0, 1), (0.5, 2), (3, 4)], 0, 4) == pytest.approx(0.75)
    # two workers: both busy during [1, 2) and [3, 4) of the span [0, 4]
    together, span = all_busy_fraction([[(0, 2), (3, 4)], [(1, 4)]])
    assert span == 4 and together == pytest.approx(0.5)
    assert all_busy_fraction([[(0, 1)], []]) == (0.0, 0.0)
