"""Training-config validation, and every config shipped in configs/ validates."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from mediar_ray.train.config import ConfigError, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

GOOD = {
    "name": "unit_test",
    "data": {"roots": ["/data/a"], "holdout_every": 5},
    "model": {
        "encoder_name": "mit_b0",
        "decoder_channels": [32, 16, 16, 16, 16],
        "decoder_pab_channels": 16,
    },
    "augment": {"crop": 128},
    "optim": {"lr": 1.0e-3, "epochs": 3, "batch_size": 2},
}


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _with(section: str | None, key: str, value) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    if section is None:
        data[key] = value
    else:
        data.setdefault(section, {})[key] = value
    return data


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(str(_write(tmp_path, GOOD)))
    assert cfg.augment.crop == 128 and cfg.augment.zoom_p == 0.5
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.sampling.min_per_cluster == 50
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize(
    "section, key, value, words",
    [
        (None, "optimiser", {}, ["unknown", "optimiser"]),
        ("augment", "noise_pp", 0.1, ["unknown", "noise_pp", "augment"]),
        ("run", "gpus", 1, ["unknown", "gpus", "run"]),
        ("optim", "lr", "fast", ["optim.lr", "float"]),
        ("optim", "epochs", 2.5, ["optim.epochs", "int"]),
        ("run", "use_gpu", "yes", ["run.use_gpu", "bool"]),
        ("data", "roots", "/data/a", ["data.roots", "list"]),
        ("augment", "flip_p", 1.5, ["augment.flip_p", "probability"]),
        ("augment", "crop", 100, ["augment.crop", "multiple of 32"]),
        ("augment", "zoom_range", [1.5, 0.25], ["augment.zoom_range"]),
        ("optim", "epochs", 0, ["optim.epochs", ">= 1"]),
        ("optim", "lr", -1.0, ["optim.lr", "> 0"]),
        ("data", "holdout_every", 1, ["data.holdout_every"]),
        ("model", "decoder_channels", [64, 32, 16], ["model.decoder_channels", "five"]),
        ("augment", "small_cell_area", -1, ["augment.small_cell_area", ">= 0"]),
        ("augment", "small_cell_max_weight", 0.5, ["augment.small_cell_max_weight", ">= 1"]),
        ("augment", "touching_weight", 0.0, ["augment.touching_weight", "> 0"]),
        ("sampling", "cluster_min", {2: 0}, ["sampling.cluster_min", "int >= 1"]),
        ("sampling", "cluster_min", {"tissue": 75}, ["sampling.cluster_min", "cluster id"]),
        ("sampling", "cluster_min", [2, 75], ["sampling.cluster_min", "dict"]),
        (None, "name", "has space", ["name"]),
        (None, "augment", 5, ["augment", "mapping"]),
    ],
)
def test_bad_values_raise_config_error_naming_file_and_key(
    tmp_path: Path, section, key, value, words
) -> None:
    path = _write(tmp_path, _with(section, key, value), "bad_config.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert "bad_config.yaml" in message
    for word in words:
        assert word in message, message


def test_cluster_min_keeps_integer_ids_through_yaml_and_json(tmp_path: Path) -> None:
    """YAML gives integer keys, JSON (a saved config) string keys: both load as ints."""
    import json

    cfg = load_config(str(_write(tmp_path, _with("sampling", "cluster_min", {2: 75, 7: 60}))))
    assert cfg.sampling.cluster_min == {2: 75, 7: 60}
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.sampling.cluster_min == {2: 75, 7: 60} and again == cfg


def test_yaml_numbers_read_as_yaml_1_2(tmp_path: Path) -> None:
    """``lr: 1e-3`` is a float, as YAML 1.2 (and JSON) read it; PyYAML's YAML 1.1 made
    it the text '1e-3' and the run was refused with "optim.lr must be float"."""
    path = tmp_path / "exp.yaml"
    text = yaml.safe_dump(GOOD).replace("lr: 0.001", "lr: 1e-3")
    path.write_text(text.replace("optim:\n", "optim:\n  weight_decay: 5E-2\n"))
    cfg = load_config(str(path))
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.05
    assert cfg.optim.epochs == GOOD["optim"]["epochs"] and isinstance(cfg.optim.epochs, int)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(broken))


# --- the files in configs/ ---------------------------------------------------------


def _slide_parser() -> argparse.ArgumentParser:
    from mediar_ray.commands.segment_slides import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _check_slide_config(path: Path, data: dict) -> None:
    """Every key is an option of the slide job, with a value of the option's type."""
    actions = {a.dest: a for a in _slide_parser()._actions if a.dest != "help"}
    unknown = sorted(set(data) - set(actions))
    assert not unknown, f"{path.name}: unknown slide-job option(s) {unknown}"
    for key, value in data.items():
        action = actions[key]
        if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
            assert isinstance(value, bool), f"{path.name}: {key} must be true/false"
        elif action.nargs is not None or isinstance(action, argparse._AppendAction):
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), key
        elif key == "workers":  # N or "MIN:MAX": the options check it themselves
            from mediar_ray.pipeline.options import SlideOptions

            assert SlideOptions(workers=value).max_workers >= 1, key
        elif action.type in (int, float):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), key
            assert action.type is float or isinstance(value, int), key
        else:
            assert isinstance(value, str), f"{path.name}: {key} must be a string"


def _is_training(data: dict) -> bool:
    return "name" in data or "optim" in data or "data" in data


def test_every_config_in_configs_validates() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    names = {p.name for p in files}
    expected = {
        "pretrain_phase1.yaml",
        "pretrain_phase2.yaml",
        "finetune1.yaml",
        "finetune2.yaml",
        "baseline.yaml",
        "predict_single.yaml",
        "predict_ensemble_tta.yaml",
    }
    assert expected <= names, expected - names
    training = []
    for path in files:
        data = yaml.safe_load(path.read_text()) or {}
        assert isinstance(data, dict), path.name
        if _is_training(data):
            training.append(load_config(str(path)))
        else:
            _check_slide_config(path, data)
    assert len(training) >= 5


def test_shipped_mediar_configs_carry_mediar_hyper_parameters() -> None:
    p1 = load_config(str(CONFIGS / "pretrain_phase1.yaml"))
    p2 = load_config(str(CONFIGS / "pretrain_phase2.yaml"))
    f1 = load_config(str(CONFIGS / "finetune1.yaml"))
    f2 = load_config(str(CONFIGS / "finetune2.yaml"))
    assert (p1.optim.epochs, p1.optim.batch_size, p1.optim.lr) == (80, 9, pytest.approx(5e-5))
    assert (p2.optim.epochs, p2.optim.batch_size) == (60, 9) and len(p2.data.mappings) == 2
    assert p1.augment.boundary_exclusion and not p1.sampling.amplified
    assert (f1.optim.epochs, f1.optim.batch_size, f1.optim.lr) == (200, 8, pytest.approx(2e-5))
    assert f1.sampling.amplified and f1.data.modality_table and f1.model.init
    assert f1.data.replay_per_batch == 0
    assert (f2.optim.epochs, f2.data.replay_per_batch) == (50, 1) and f2.data.public_mappings
    assert {c.seed for c in (p1, p2, f1, f2)} == {19940817}
    for cfg in (p1, p2, f1, f2):
        assert cfg.model.encoder_name == "mit_b5" and cfg.augment.crop == 512
    single = yaml.safe_load((CONFIGS / "predict_single.yaml").read_text())
    ensemble = yaml.safe_load((CONFIGS / "predict_ensemble_tta.yaml").read_text())
    assert single["tta"] is False and len(single["weights"]) == 1
    assert ensemble["tta"] is True and len(ensemble["weights"]) == 2


def test_slide_config_check_can_fail(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="unknown"):
        _check_slide_config(tmp_path / "x.yaml", {"tile": 512})
    with pytest.raises(AssertionError):
        _check_slide_config(tmp_path / "x.yaml", {"tta": "yes"})
    with pytest.raises(AssertionError):
        _check_slide_config(tmp_path / "x.yaml", {"tile_size": 1.5})


def _moved_tensors(a: dict, b: dict) -> float:
    """Fraction of the floating-point tensors of state dict ``a`` that differ in ``b``."""
    import torch

    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    return sum(not torch.equal(a[k], b[k]) for k in floats) / len(floats)


def test_cpu_small_starts_from_the_shipped_previous_model() -> None:
    """The bundled model's recipe is reproducible from the repository: ``cpu_small.yaml``
    starts (``model.init``, a path from the repository root) from the result of
    ``cpu_small_stage1.yaml``, which starts from the model bundled before H&E. Every link is
    a file here that loads, with every key, into its config's architecture, all share the
    bundled model's architecture, and each run moved (nearly) every tensor."""
    from mediar_ray.model import load_model, model_params
    from mediar_ray.weights import default_weights

    bundled = load_model(default_weights())
    chain, inits = [bundled], []
    for name in ("cpu_small.yaml", "cpu_small_stage1.yaml"):
        cfg = load_config(str(CONFIGS / name))
        init = CONFIGS.parent / cfg.model.init
        assert cfg.model.init.startswith("configs/") and init.is_file(), (name, cfg.model.init)
        params = {k: v for k, v in cfg.model.to_dict().items() if k != "init"}
        start = load_model(str(init), **params)
        assert model_params(start) == model_params(bundled)
        chain.append(start)
        inits.append(init.name)
    assert inits == ["cpu_small_stage1.safetensors", "cpu_small_stage0.safetensors"]
    for later, earlier in zip(chain, chain[1:]):
        assert _moved_tensors(earlier.state_dict(), later.state_dict()) > 0.9
