"""The default sliding window is the crop size the weights were trained on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from mediar_ray.cli import main
from mediar_ray.io import read_image
from mediar_ray.model import build_model, save_model
from mediar_ray.segment import load_models, models_window, segment_image
from mediar_ray.train.config import load_config
from mediar_ray.weights import DEFAULT_ROI_SIZE, CheckpointError, default_weights, window_size

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "encoder_name": "mit_b0",
    "decoder_channels": [16, 16, 16, 16, 16],
    "decoder_pab_channels": 16,
}


def _saved(tmp_path, name: str, metadata: dict | None) -> str:
    path = str(tmp_path / name)
    save_model(build_model(encoder_weights=None, **TINY), path, TINY, metadata)
    return path


def test_bundled_model_runs_at_its_training_crop():
    crop = load_config(str(REPO / "configs" / "cpu_small.yaml")).augment.crop
    assert window_size([default_weights()]) == crop == 256


def test_checkpoints_without_a_training_crop_keep_mediars_window(ref_dir, tmp_path):
    assert window_size([str(ref_dir / "model_a.pth")]) == DEFAULT_ROI_SIZE == 512
    assert window_size([_saved(tmp_path, "plain.safetensors", None)]) == 512
    odd = {"training": {"config": {"augment": {"crop": 100}}}}  # not a window size
    assert window_size([_saved(tmp_path, "odd.safetensors", odd)]) == 512
    own = {"training": {"config": {"augment": {"crop": 384}}}}
    assert window_size([_saved(tmp_path, "own.safetensors", own)]) == 384


def test_ensemble_trained_at_different_crops_asks_for_roi_size(ref_dir):
    with pytest.raises(CheckpointError, match="--roi-size"):
        window_size([default_weights(), str(ref_dir / "model_a.pth")])
    with pytest.raises(CheckpointError, match="not found"):
        window_size(["/nonexistent/model.safetensors"])


def test_segment_uses_the_models_window_unless_told(data_dir, tmp_path):
    """On a 256 x 320 DSB2018 field a 512-px window pads the image, a 256-px one does
    not: the two give different outputs, and the default is the 256-px one."""
    image_url = str(sorted((data_dir / "dsb2018" / "images").glob("*.png"))[0])
    image = read_image(image_url)
    assert image.shape[:2] == (256, 320)
    models = load_models(None, None, "cpu")
    expected = {
        roi: segment_image(image, models, tta=False, roi_size=roi).raw for roi in (256, 512)
    }
    assert not np.allclose(expected[256], expected[512], atol=1e-3)
    assert [m.roi_size for m in models] == [256]
    np.testing.assert_array_equal(segment_image(image, models, tta=False).raw, expected[256])
    for flags, roi in (([], 256), (["--roi-size", "512"], 512)):
        out = tmp_path / f"out{roi}"
        assert (
            main(
                [
                    "segment",
                    image_url,
                    "--output",
                    str(out),
                    "--no-tta",
                    "--save-raw",
                    "--device",
                    "cpu",
                    *flags,
                ]
            )
            == 0
        )
        raw = np.load(next(out.glob("*_raw.npy")))
        np.testing.assert_allclose(raw, expected[roi], atol=1e-5)


def test_slide_job_resolves_the_window_with_its_weights(ref_dir):
    from mediar_ray.commands.segment_slides import add_arguments, options_from_args
    from mediar_ray.pipeline.run import check_weights

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, roi in (
        ([], 256),
        (["--weights", str(ref_dir / "model_a.pth")], 512),
        (["--roi-size", "128"], 128),
    ):
        opts = options_from_args(parser.parse_args(argv))
        opts, _ = check_weights(opts)
        assert opts.roi_size == roi and opts.result_options()["roi_size"] == roi


def test_evaluate_reports_the_window_it_used(dsb_config, tmp_path):
    config, _ = dsb_config(2)
    for flags, roi in (([], 256), (["--roi-size", "512"], 512)):
        report = tmp_path / f"held{roi}.json"
        assert (
            main(["evaluate", "--config", str(config), "--no-tta", "--json", str(report), *flags])
            == 0
        )
        assert json.loads(report.read_text())["roi_size"] == roi


def test_loaded_models_carry_their_window(ref_dir, tiny):
    bundled = load_models(None, None, "cpu")[0]
    mediar = load_models([tiny[0]], tiny[1], "cpu")[0]
    assert (bundled.roi_size, mediar.roi_size) == (256, 512)
    assert models_window([mediar, mediar]) == 512
    with pytest.raises(ValueError, match="--roi-size"):
        models_window([bundled, mediar])
