"""What a user meets when an input, an option or the environment is wrong (issue 20).

Each test reproduces one class of failure of the commands as they were (a traceback, a
silently wrong result, or the other inputs lost) and checks the fixed behaviour: one line
naming the file or option and the fix, exit code 2 for usage errors and 1 for failed
items, every other item still done and reported.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import tifffile
import torch
import yaml

from mediar_ray.cli import main
from mediar_ray.io import read_image
from mediar_ray.metrics import cellseg_f1
from mediar_ray.segment import load_models, segment_image

pytestmark = pytest.mark.usefixtures("single_threaded")

# Two real 256 x 256 fluorescence images of DSB2018 (small: quick to segment on CPU).
DSB = ["072ff14c1d32", "0bda515e3702"]
FAST = ["--no-tta", "--device", "cpu"]


def dsb_image(data_dir, prefix: str):
    return next((data_dir / "dsb2018/images").glob(prefix + "*.png"))


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def one_line_naming(caplog, *words: str) -> bool:
    """Some error record is one line and holds every word."""
    return any("\n" not in m and all(w in m for w in words) for m in error_lines(caplog))


@pytest.fixture(scope="module")
def bundled():
    return load_models(None, device="cpu")


# ------------------------------------------------------------------ non-finite pixels


def _float_image(data_dir) -> np.ndarray:
    """A real fluorescence image as float32 in [0, 1] (grey)."""
    return read_image(str(dsb_image(data_dir, DSB[0])))[:, :, 0].astype(np.float32) / 255


@pytest.mark.parametrize("case", ["nan", "-inf", "+inf", "several"])
def test_non_finite_pixels_segment_like_the_clean_image(data_dir, bundled, case):
    """One NaN used to invert the normalisation (3 cells instead of 7), one -inf to blank
    it; now non-finite pixels are background and the rest segments as the clean image."""
    clean = _float_image(data_dir)
    bad = clean.copy()
    rng = np.random.default_rng(20)
    if case == "several":
        ys, xs = rng.integers(0, clean.shape[0], 12), rng.integers(0, clean.shape[1], 12)
        bad[ys, xs] = np.array([np.nan, np.inf, -np.inf] * 4, np.float32)
    else:
        bad[tuple(rng.integers(0, clean.shape[0], 2))] = float(case)
    expected = segment_image(clean, bundled, tta=False, device="cpu").labels
    got = segment_image(bad, bundled, tta=False, device="cpu").labels
    assert expected.max() >= 5  # a real image with cells
    if not np.array_equal(got, expected):
        m = cellseg_f1(expected, got, drop_border=False)
        assert m.f1 >= 0.99 and got.max() == expected.max(), (case, m, got.max())


# ------------------------------------------------------------------ GPU and devices


def test_device_that_is_not_there_is_one_line_and_exit_2(data_dir, tmp_path, caplog):
    """``segment --device cuda`` without a GPU was a traceback. cuda:N with N = the
    number of GPUs is absent on every machine, with or without GPUs."""
    device = f"cuda:{torch.cuda.device_count()}"
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(dsb_image(data_dir, DSB[0])),
            "-o",
            str(out),
            "--device",
            device,
            "--no-tta",
        ]
    )
    assert code == 2
    assert one_line_naming(caplog, f"--device {device}", "--device cpu")
    assert not list(out.glob("*_label.tiff"))


# ------------------------------------------------------------------ options


@pytest.fixture()
def train_config(tmp_path, data_dir):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = dsb_image(data_dir, DSB[0])
    shutil.copy(image, root / "images")
    shutil.copy(data_dir / "dsb2018/labels" / (image.stem + "_label.tiff"), root / "labels")
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "data": {"roots": [str(root)]},
                "run": {"storage_path": str(tmp_path / "runs")},
            }
        )
    )
    return config


@pytest.mark.parametrize(
    "command, option, value, valid",
    [
        ("segment", "--roi-size", "100", "a multiple of 32 from 32 to 4096"),
        ("segment", "--roi-size", "0", "a multiple of 32 from 32 to 4096"),
        ("segment", "--sw-batch-size", "-1", "an integer from 1 to 1024"),
        ("segment", "--sw-batch-size", "0", "an integer from 1 to 1024"),
        ("train", "--num-workers", "0", "an integer of at least 1"),
        ("train", "--epochs", "-3", "an integer of at least 1"),
        ("train", "--max-epochs-this-run", "0", "an integer of at least 1"),
    ],
)
def test_option_out_of_range_stops_before_any_work(
    data_dir, tmp_path, train_config, capsys, command, option, value, valid
):
    """A bad --roi-size or --sw-batch-size used to fail every image late with an internal
    message (or, negative, write empty labels); now argparse stops at once."""
    out = tmp_path / "out"
    argv = (
        ["segment", str(dsb_image(data_dir, DSB[0])), "-o", str(out), *FAST]
        if command == "segment"
        else ["train", "--config", str(train_config)]
    )
    with pytest.raises(SystemExit) as stop:
        main([*argv, option, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value} is not valid: {valid}" in err
    assert not out.exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ inputs and outputs


def test_unwritable_output_is_one_line_and_exit_2(data_dir, tmp_path, caplog):
    """An output folder that cannot be created was a traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(["segment", str(dsb_image(data_dir, DSB[0])), "-o", str(blocker / "out"), *FAST])
    assert code == 2
    assert one_line_naming(caplog, "--output", str(blocker / "out"), "writable folder")


def test_missing_input_is_reported_and_the_others_are_segmented(data_dir, tmp_path, capsys, caplog):
    """One missing input used to stop the whole command before any image was done."""
    good = dsb_image(data_dir, DSB[0])
    missing = tmp_path / "nope" / "gone.png"
    out = tmp_path / "out"
    assert main(["segment", str(good), str(missing), "-o", str(out), *FAST]) == 1
    assert (out / f"{good.stem}_label.tiff").is_file()
    report = capsys.readouterr().out
    assert f"{good} -> {good.stem}_label.tiff" in report
    assert f"{missing}: not found" in report
    assert one_line_naming(caplog, str(missing), "not found: check the path")


def test_bad_url_scheme_is_reported_and_the_others_are_segmented(
    data_dir, tmp_path, capsys, caplog
):
    """An unknown URL scheme stopped everything with fsspec's bare 'Protocol not known'."""
    good = dsb_image(data_dir, DSB[0])
    out = tmp_path / "out"
    assert main(["segment", "nosuchscheme://bucket/a.png", str(good), "-o", str(out), *FAST]) == 1
    assert (out / f"{good.stem}_label.tiff").is_file()
    assert one_line_naming(caplog, "nosuchscheme://bucket/a.png", "unknown URL scheme")
    assert main(["segment", "nosuchscheme://bucket/a.png", "-o", str(out), *FAST]) == 2


def test_unknown_encoder_is_one_line_and_exit_2(data_dir, tmp_path, caplog):
    """An unknown encoder name in --model-config was a KeyError traceback listing every
    encoder segmentation_models_pytorch knows."""
    code = main(
        [
            "segment",
            str(dsb_image(data_dir, DSB[0])),
            "-o",
            str(tmp_path / "o"),
            "--model-config",
            '{"encoder_name": "mit_b9"}',
            *FAST,
        ]
    )
    assert code == 2
    assert one_line_naming(caplog, "unknown encoder_name 'mit_b9'", "mit_b5")


def test_corrupt_and_missing_checkpoints_are_one_line_and_exit_2(
    data_dir, tmp_path, train_config, caplog
):
    """A missing checkpoint was a traceback in ``evaluate --config``."""
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    code = main(
        [
            "segment",
            str(dsb_image(data_dir, DSB[0])),
            "-o",
            str(tmp_path / "o"),
            "--weights",
            str(corrupt),
            *FAST,
        ]
    )
    assert code == 2 and one_line_naming(caplog, str(corrupt), "corrupt")
    caplog.clear()
    missing = tmp_path / "missing.safetensors"
    code = main(
        [
            "evaluate",
            "--config",
            str(train_config),
            "--split",
            "train",
            "--weights",
            str(missing),
            "--no-tta",
        ]
    )
    assert code == 2 and one_line_naming(caplog, str(missing), "not found")


# ------------------------------------------------------------------ s3 credentials


@pytest.fixture()
def s3_without_credentials(monkeypatch, tmp_path, data_dir):
    """A real S3 server on loopback holding one image; the environment then loses its
    credentials (and any other place botocore could find some)."""
    import fsspec
    from s3_server import s3_client, s3_server

    with s3_server() as env:
        client = s3_client(env, "lab")
        client.put_object(
            Bucket="lab", Key="in/cells.png", Body=dsb_image(data_dir, DSB[0]).read_bytes()
        )
        for key in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
        ):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        fsspec.filesystem("s3").clear_instance_cache()
        yield client
        fsspec.filesystem("s3").clear_instance_cache()


def test_s3_without_credentials_is_one_line_and_exit_2(
    s3_without_credentials, data_dir, tmp_path, caplog
):
    """Missing credentials for an s3:// input or output were a botocore traceback."""
    code = main(["segment", "s3://lab/in/", "-o", str(tmp_path / "out"), *FAST])
    assert code == 2
    assert one_line_naming(caplog, "s3://lab/in/", "no credentials", "AWS_ACCESS_KEY_ID")
    caplog.clear()
    code = main(["segment", str(dsb_image(data_dir, DSB[0])), "-o", "s3://lab/out", *FAST])
    assert code == 2
    assert one_line_naming(caplog, "--output s3://lab/out", "no credentials", "AWS_ACCESS_KEY_ID")


# ------------------------------------------------------------------ evaluate


def test_evaluate_shape_mismatch_keeps_the_other_scores(data_dir, tmp_path, capsys, caplog):
    """A prediction whose size differs from its truth stopped ``evaluate`` and lost every
    other image's score; now it is reported, the rest scored, exit code 1."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    labels = sorted((data_dir / "usiigaci_phase/labels").glob("*_label.tiff"))[:3]
    for path in labels:
        shutil.copy(path, gt / path.name)
    shutil.copy(labels[0], pred / labels[0].name)
    shutil.copy(labels[2], pred / labels[2].name)
    dsb_label = data_dir / "dsb2018/labels" / (dsb_image(data_dir, DSB[0]).stem + "_label.tiff")
    shutil.copy(dsb_label, pred / labels[1].name)  # 256 x 256 against 1022 x 1024
    csv = tmp_path / "scores.csv"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(csv)]) == 1
    rows = csv.read_text().splitlines()
    assert len(rows) == 4  # header, the two good images, mean
    out = capsys.readouterr().out
    for good in (labels[0], labels[2]):
        assert good.name[: -len("_label.tiff")] in out
    bad = labels[1].name[: -len("_label.tiff")]
    assert one_line_naming(caplog, bad, "256x256", "1022x1024")
    assert tifffile.imread(pred / labels[1].name).shape == (256, 256)
