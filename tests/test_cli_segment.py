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
    # Parity with the original MEDIAR outputs holds in fp32 ("auto" is bf16 on CPUs with
    # bf16 units).
    argv = [
        "segment",
        str(inputs),
        "--output",
        str(out),
        "--save-raw",
        "--model-config",
        str(ref_dir / "index.json"),
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
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
    code = main(
        [
            "segment",
            str(inputs),
            "--output",
            out,
            "--save-raw",
            "--no-tta",
            "--weights",
            str(ref_dir / "model_a.pth"),
            "--model-config",
            str(ref_dir / "index.json"),
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    import fsspec

    fs = fsspec.filesystem("memory")
    written = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/cli-test/out", detail=False))
    assert {f"{n}_raw.npy" for n in FIXTURE_IMAGES} <= set(written)
    assert "broken.tif" in caplog.text and "1 input(s) failed" in caplog.text


def test_missing_weights_file_is_a_clear_error(inputs, tmp_path, caplog):
    code = main(
        [
            "segment",
            str(inputs),
            "--output",
            str(tmp_path / "o"),
            "--save-raw",
            "--weights",
            str(tmp_path / "missing.pth"),
        ]
    )
    assert code == 2 and "missing.pth" in caplog.text


# Four real, different 256 x 256 images of DSB2018 (quick to segment on CPU).
DSB = ["072ff14c1d32", "0bda515e3702", "13c8ff1f4988", "1c681dfa5cf7"]
FAST = ["--no-tta", "--device", "cpu"]


def _dsb(data_dir, prefix):
    return next((data_dir / "dsb2018/images").glob(prefix + "*.png"))


def test_inputs_sharing_a_name_get_distinct_outputs_with_their_own_labels(
    data_dir, tmp_path, capsys
):
    """a.1.png and a.2.png, f1/slide.png and f2/slide.png used to give one output each
    (the second overwrote the first, and the report said "2 of 2")."""
    from mediar_ray.io import output_names, read_image
    from mediar_ray.segment import load_models, segment_image

    inputs = [tmp_path / "in" / p for p in ("a.1.png", "a.2.png", "f1/slide.png", "f2/slide.png")]
    for path, prefix in zip(inputs, DSB):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_dsb(data_dir, prefix), path)
    out = tmp_path / "out"
    assert main(["segment", *map(str, inputs), "-o", str(out), *FAST]) == 0
    names = output_names([str(p) for p in inputs])
    assert names[str(inputs[0])] == "a.1" and names[str(inputs[1])] == "a.2"
    assert names[str(inputs[2])] != names[str(inputs[3])]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}_label.tiff" for n in names.values()
    )
    report = capsys.readouterr().out
    assert "segmented 4 of 4 image(s)" in report
    models = load_models(None, device="cpu")
    for path in inputs:  # the right labels under the right name
        name = names[str(path)]
        assert f"{path} -> {name}_label.tiff" in report
        expected = segment_image(read_image(str(path)), models, tta=False, device="cpu")
        np.testing.assert_array_equal(tifffile.imread(out / f"{name}_label.tiff"), expected.labels)


def test_output_folder_among_the_inputs_is_not_segmented_again(data_dir, tmp_path, caplog):
    """``segment in/ --output in/`` run twice used to segment its own label files."""
    import logging

    caplog.set_level(logging.INFO, logger="mediar_ray")
    folder = tmp_path / "in"
    folder.mkdir()
    for prefix in DSB[:2]:
        shutil.copy(_dsb(data_dir, prefix), folder)
    images = sorted(p.name for p in folder.iterdir())
    assert main(["segment", str(folder), "--output", str(folder), *FAST]) == 0
    first = {p.name: tifffile.imread(p) for p in folder.glob("*_label.tiff")}
    assert len(first) == 2
    caplog.clear()
    assert main(["segment", str(folder), "--output", str(folder), *FAST]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(images + list(first))
    for name, labels in first.items():
        np.testing.assert_array_equal(tifffile.imread(folder / name), labels)
        assert f"{folder / name}: skipped" in caplog.text


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "mediar_ray.cli", "segment", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--save-raw" in result.stdout and "--weights" in result.stdout
    assert shutil.which("mediar-ray") is not None
