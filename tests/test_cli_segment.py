"""``mediar-ray segment`` end to end on the reference images."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from mediar_ray.cli import main
from mediar_ray.dynamics import flows_to_labels

FIXTURE_IMAGES = ["phase_gray_uint16", "tissue_rgb_uint8"]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture()
def inputs(ref_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in FIXTURE_IMAGES:
        shutil.copy(ref_dir / f"{name}.tif", folder)
    return folder


@pytest.mark.parametrize(
    "kind, flags",
    [
        ("single", ["--weights", "{a}", "--no-tta"]),
        ("tta", ["--weights", "{a}", "--tta"]),
        ("ensemble_tta", ["--weights", "{a}", "--weights", "{b}"]),
    ],
)
def test_save_raw_matches_original(ref_dir, inputs, tmp_path, kind, flags):
    out = tmp_path / "out"
    weights = {"a": str(ref_dir / "model_a.pth"), "b": str(ref_dir / "model_b.pth")}
    argv = ["segment", str(inputs), "--output", str(out), "--save-raw",
            "--model-config", str(ref_dir / "index.json"), "--device", "cpu"]
    argv += [f.format(**weights) for f in flags]
    assert main(argv) == 0
    for name in FIXTURE_IMAGES:
        raw = np.load(out / f"{name}_raw.npy")
        assert rel_l2(raw, np.load(ref_dir / f"{name}.{kind}.npy")) < 1e-5
        labels = tifffile.imread(out / f"{name}_label.tiff")
        assert labels.shape == raw.shape[1:] and labels.dtype == np.uint16
        np.testing.assert_array_equal(labels, flows_to_labels(raw))


def test_bad_file_is_reported_and_the_rest_finish(ref_dir, inputs, tmp_path, caplog):
    (inputs / "broken.tif").write_bytes(b"II*\x00garbage")
    out = "memory://cli-test/out"
    code = main(["segment", str(inputs), "--output", out, "--save-raw", "--no-tta",
                 "--weights", str(ref_dir / "model_a.pth"),
                 "--model-config", str(ref_dir / "index.json"), "--device", "cpu"])
    assert code == 1
    import fsspec

    fs = fsspec.filesystem("memory")
    written = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/cli-test/out", detail=False))
    assert {f"{n}_raw.npy" for n in FIXTURE_IMAGES} <= set(written)
    assert "broken.tif" in caplog.text and "1 image(s) failed" in caplog.text


def test_missing_weights_file_is_a_clear_error(inputs, tmp_path, caplog):
    code = main(["segment", str(inputs), "--output", str(tmp_path / "o"), "--save-raw",
                 "--weights", str(tmp_path / "missing.pth")])
    assert code == 2 and "missing.pth" in caplog.text


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "mediar_ray.cli", "segment", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--save-raw" in result.stdout and "--weights" in result.stdout
    assert shutil.which("mediar-ray") is not None
