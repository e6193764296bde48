"""MEDIARFormer structure and checkpoint loading against the original MEDIAR outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mediar_ray.model import (
    CheckpointError,
    build_model,
    load_model,
    model_params,
    save_model,
)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def params(ref_dir):
    return json.loads((ref_dir / "index.json").read_text())["model_params"]


def test_default_model_matches_released_state_dict(ref_dir):
    expected = json.loads((ref_dir / "mit_b5_state_dict_shapes.json").read_text())
    got = {k: list(v.shape) for k, v in build_model().state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("name", ["model_a", "model_b"])
def test_reference_checkpoints_forward_like_the_original(ref_dir, params, name):
    model = load_model(str(ref_dir / f"{name}.pth"), **params)
    x = torch.from_numpy(np.load(ref_dir / "forward_window.input.npy"))
    with torch.inference_mode():
        out = model(x).numpy()
    assert out.shape == (1, 3, 256, 256)
    assert rel_l2(out, np.load(ref_dir / f"forward_window.{name}.npy")) < 1e-5


def _saved(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_renamed_key_is_named(ref_dir, params, tmp_path):
    state = torch.load(ref_dir / "model_a.pth", weights_only=True)
    state["cellprob_head.0.weights"] = state.pop("cellprob_head.0.weight")
    with pytest.raises(CheckpointError) as err:
        load_model(_saved(tmp_path, state), **params)
    assert "cellprob_head.0.weight'" in str(err.value)
    assert "cellprob_head.0.weights" in str(err.value)
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)


def test_missing_key_is_named(ref_dir, params, tmp_path):
    state = torch.load(ref_dir / "model_a.pth", weights_only=True)
    del state["gradflow_head.3.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \['gradflow_head.3.bias'\]"):
        load_model(_saved(tmp_path, state), **params)


def test_wrong_shape_is_named(ref_dir, params, tmp_path):
    state = torch.load(ref_dir / "model_a.pth", weights_only=True)
    state["gradflow_head.3.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"gradflow_head.3.bias: checkpoint \(5,\)"):
        load_model(_saved(tmp_path, state), **params)


def test_wrong_model_config_is_reported(ref_dir):
    # The released-model defaults (mit_b5) do not fit the small reference checkpoint.
    with pytest.raises(CheckpointError, match="--model-config"):
        load_model(str(ref_dir / "model_a.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint_gives_clear_error(ref_dir, params, tmp_path, suffix):
    src = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        src.write_bytes((ref_dir / "model_a.pth").read_bytes())
    else:
        save_model(load_model(str(ref_dir / "model_a.pth"), **params), str(src))
    data = src.read_bytes()
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(bad), **params)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope.pth"))


def test_safetensors_round_trip_through_fsspec_url(ref_dir, params):
    model = load_model(str(ref_dir / "model_b.pth"), **params)
    url = "memory://ckpt/model_b.safetensors"
    save_model(model, url, metadata={"note": "round trip"})
    again = load_model(url)  # parameters come from the file itself
    assert model_params(again) == model_params(model)
    x = torch.from_numpy(np.load(ref_dir / "forward_window.input.npy"))
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


class NotATensor:  # arbitrary pickled objects must never be loaded
    pass


def test_pickled_objects_are_refused(tmp_path, params):
    path = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(CheckpointError):
        load_model(str(path), **params)
