"""The napari plugin (issue 38, must-show 1) with a real napari viewer on a real slide-job
output (:mod:`slide_output`) and a real image: the reader's layers, their physical
scales, the cells' features and laziness; the widget's labels against ``mediar-ray
segment`` with the same options, and its cancel button.

The viewer is napari's ``ViewerModel`` (the viewer without its OpenGL canvas: layers,
``open`` through the npe2 plugin manager, status on hover) and the widget a real Qt
widget on the offscreen platform (pytest-qt's ``qtbot``). ``make_napari_viewer`` needs
an OpenGL context, which the offscreen platform does not give without an X server (vispy
fails in ``glGetString`` on this machine)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from napari.components import ViewerModel
from slide_output import MPP, build

import mediar_ray.viewer
from mediar_ray.io import read_image

MANIFEST = Path(mediar_ray.viewer.__file__).with_name("napari.yaml")


@pytest.fixture(scope="session")
def job_output(tmp_path_factory, data_dir) -> Path:
    return build(tmp_path_factory.getbasetemp() / "slide_job", data_dir)


@pytest.fixture()
def plugin(npe2pm):
    """The plugin registered from its manifest in napari's test plugin manager (the
    entry point is found the same way once the package is installed)."""
    from npe2 import PluginManifest

    if "mediar-ray" not in npe2pm:
        npe2pm.register(PluginManifest.from_file(MANIFEST))
    return npe2pm


def test_manifest_is_valid_and_names_reader_and_widget():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "mediar-ray"
    assert [r.filename_patterns for r in manifest.contributions.readers] == [["*.zarr"]]
    assert [w.display_name for w in manifest.contributions.widgets] == ["Segment cells (MEDIAR)"]
    for command in manifest.contributions.commands:  # every python_name imports
        assert command.exec is not None or command.python_name


@pytest.mark.slow  # the shared job output takes about a minute to make
def test_reader_layers_scales_features_lazy(plugin, job_output):
    viewer = ViewerModel()
    layers = viewer.open(str(job_output), plugin="mediar-ray")
    kinds = {layer.name: type(layer).__name__ for layer in layers}
    assert kinds == {"he image": "Image", "he tissue": "Labels", "he cells": "Labels"}
    image, tissue, cells = (viewer.layers[n] for n in ("he image", "he tissue", "he cells"))
    # Physical scales: labels at the pixel size given to the job, the viewing image at
    # 4 processing pixels per pixel, the tissue mask at its thumbnail grid.
    np.testing.assert_allclose(cells.scale, [MPP, MPP])
    np.testing.assert_allclose(image.scale, [4 * MPP, 4 * MPP])
    assert image.rgb and image.multiscale and cells.multiscale and tissue.multiscale
    group = zarr.open_group(str(job_output), mode="r")
    thumb = group["labels/tissue/0"].shape
    np.testing.assert_allclose(tissue.scale, [MPP * 768 / thumb[0], MPP * 768 / thumb[1]])
    # All three cover the same 768 x 768 level-0 px, in micrometres from the centre of
    # the first (napari's extent runs from first to last pixel centre: add half pixels).
    for layer in (image, tissue, cells):
        lo, hi = layer.extent.world
        half = np.asarray(layer.scale) / 2
        np.testing.assert_allclose(
            [lo - half, hi + half], [[-MPP / 2] * 2, [768 * MPP - MPP / 2] * 2], atol=1e-6
        )
    # Lazy: every level of every layer is a dask array over the zarr chunks.
    for layer in (image, tissue, cells):
        assert all(isinstance(level, da.Array) for level in layer.data)
    # One feature row per cell of the labels, keyed by the label id.
    labels = group["labels/cells/0"][:]
    ids = np.unique(labels[labels > 0])
    assert len(ids) > 10
    np.testing.assert_array_equal(np.sort(cells.features["index"].to_numpy()), ids)
    assert {"area", "area_um2", "prob_mean", "intensity_mean_0"} <= set(cells.features)
    # The features are the cell's own: its area is its pixel count.
    k = int(ids[len(ids) // 2])
    row = cells.features[cells.features["index"] == k].iloc[0]
    assert row["area"] == int((labels == k).sum())
    # Hovering a cell shows its features (napari's status), at its centroid in um.
    y, x = (np.argwhere(labels == k).mean(axis=0) + 0.5).astype(int)
    status = cells.get_status((y * MPP, x * MPP), world=True)
    assert f"id: {k}, area: {int(row['area'])}," in status["coordinates"]


def test_reader_declines_other_zarr_stores(tmp_path, plugin):
    from mediar_ray.viewer.reader import napari_get_reader

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    assert napari_get_reader(str(tmp_path / "other.zarr")) is None
    assert napari_get_reader(str(tmp_path / "image.tif")) is None


def _segment_cli(image_path: Path, out: Path) -> np.ndarray:
    cmd = [
        sys.executable,
        "-c",
        "from mediar_ray.cli import main; raise SystemExit(main())",
        "segment",
        str(image_path),
        "--output",
        str(out),
        "--no-tta",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tifffile.imread(next(out.glob("*_label.tiff")))


@pytest.mark.slow  # two whole-image segmentations (widget, CLI subprocess): ~50 s
def test_widget_gives_the_labels_of_mediar_ray_segment(qtbot, data_dir, tmp_path):
    from mediar_ray.viewer.widget import SegmentWidget

    path = min((data_dir / "dsb2018" / "images").glob("*.png"))
    image = read_image(str(path))
    viewer = ViewerModel()
    viewer.add_image(image, name="field", rgb=image.ndim == 3)
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.layer_box.currentText() == "field"
    widget.tta.setChecked(False)
    with qtbot.waitSignal(widget.start().finished, timeout=300_000):
        pass
    assert widget.status.text().endswith("cells"), widget.status.text()
    result = viewer.layers["field cells"]
    expected = _segment_cli(path, tmp_path / "cli")
    assert expected.max() > 5
    np.testing.assert_array_equal(np.asarray(result.data), expected)
    ids = np.unique(expected[expected > 0])
    np.testing.assert_array_equal(np.sort(result.features["index"].to_numpy()), ids)
    np.testing.assert_array_equal(
        result.features["area"].to_numpy(), np.bincount(expected.ravel())[ids]
    )


def test_widget_cancel_stops_before_a_layer_is_added(qtbot, data_dir):
    from mediar_ray.viewer.segment import Progress
    from mediar_ray.viewer.widget import SegmentWidget

    image = read_image(str(min((data_dir / "dsb2018" / "images").glob("*.png"))))
    viewer = ViewerModel()
    viewer.add_image(image, name="field", rgb=image.ndim == 3)
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    worker = widget.start()
    steps = []

    def cancel_at_first(item):  # cancel as soon as the first step is announced
        steps.append(item)
        if isinstance(item, Progress):
            widget.cancel()

    worker.yielded.connect(cancel_at_first)
    with qtbot.waitSignal(worker.aborted, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    assert widget.status.text() == "cancelled"
    # The cancel reaches the worker thread while it may already be in its next step:
    # it stops there, before any result.
    assert 1 <= len(steps) <= 2 and all(isinstance(s, Progress) for s in steps)
    assert [layer.name for layer in viewer.layers] == ["field"]


@pytest.mark.slow  # two runs of the slide job on a local Ray: ~2 min
def test_a_large_layer_goes_through_the_slide_jobs_tiled_path(data_dir, tmp_path):
    """Above ``max_side`` the widget's segmentation is the slide job's: tiles with
    halos, stitched (here 256-px tiles on a 512 x 640 real phase-contrast crop, so that
    cells cross tile borders), giving the labels of ``mediar-ray segment-slides``."""
    from mediar_ray.viewer.segment import SegmentRequest, WidgetResult, run_segmentation

    image = read_image(str(data_dir / "usiigaci_phase/images/train_set1.tif"))[:512, :640]
    req = SegmentRequest(tile=256, max_side=300)
    # A lazy layer (dask, as the reader gives): read tile by tile into the job's input.
    lazy = da.from_array(image, chunks=200)
    result = list(run_segmentation(lazy, req))[-1]
    assert isinstance(result, WidgetResult) and result.tiled
    path = tmp_path / "phase.tif"
    tifffile.imwrite(path, image, tile=(256, 256))
    cmd = [
        sys.executable,
        "-c",
        "from mediar_ray.cli import main; raise SystemExit(main())",
        "segment-slides",
        str(path),
        str(tmp_path / "out"),
        "--no-tta",
        "--tile-size",
        "256",
        "--tissue",
        "off",
    ]
    done = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = zarr.open_array(str(tmp_path / "out/phase.zarr/labels/cells/0"), mode="r")[:]
    assert expected.max() > 10
    np.testing.assert_array_equal(result.labels, expected)
    np.testing.assert_array_equal(
        np.sort(result.features["index"].to_numpy()), np.unique(expected[expected > 0])
    )


@pytest.mark.slow  # uses the shared job output
def test_reader_shows_labels_without_features_when_there_is_no_cell_table(
    plugin, job_output, tmp_path
):
    """An output written with --no-cells (here: the real output copied without its
    OUTPUT/cells/) still opens: the same layers, the cells without features."""
    import shutil

    copy = tmp_path / "out" / job_output.name
    shutil.copytree(job_output, copy)
    viewer = ViewerModel()
    viewer.open(str(copy), plugin="mediar-ray")
    assert [layer.name for layer in viewer.layers] == ["he image", "he tissue", "he cells"]
    assert viewer.layers["he cells"].features.shape[1] == 0
