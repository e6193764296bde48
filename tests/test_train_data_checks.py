"""Bad pairs are found where pairs are made (map-dataset, data.roots, mappings), listed
with their reason and left out, or refused with --strict; validation and ``evaluate``
score every good pair and list the bad ones (issue 43). All on real DSB2018 pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from mediar_ray.cli import main
from mediar_ray.data.mapping import Pair, map_dataset
from mediar_ray.io import read_image
from mediar_ray.train.config import load_config


def _copy(data_dir: Path, n: int, root: Path) -> list[str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    stems = []
    for lab in sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff"))[:n]:
        stem = lab.name[: -len("_label.tiff")]
        shutil.copy(next((data_dir / "dsb2018" / "images").glob(stem + ".*")), root / "images")
        shutil.copy(lab, root / "labels")
        stems.append(stem)
    return stems


@pytest.fixture()
def label_root(tmp_path: Path, data_dir: Path) -> tuple[Path, dict[str, str]]:
    """Three good pairs; the labels of three more rewritten: float32 with whole values
    (usable), float32 with fractional values, and negative ids."""
    root = tmp_path / "dsb"
    stems = _copy(data_dir, 6, root)
    kinds = {"whole_float": stems[3], "fractional": stems[4], "negative": stems[5]}
    for kind, stem in kinds.items():
        path = root / "labels" / f"{stem}_label.tiff"
        labels = read_image(str(path)).astype(np.float32)
        labels = {"whole_float": labels, "fractional": labels * 0.5, "negative": -labels}[kind]
        tifffile.imwrite(path, labels)
    return root, kinds


def test_map_dataset_refuses_fractional_and_negative_labels(label_root, tmp_path, capsys):
    """map-dataset used to accept both; training then crashed at the end of an epoch
    (float labels in validation) or mid-epoch (negative ids, 860 lines, no file named)."""
    root, kinds = label_root
    mapping = map_dataset(str(root), check=True)
    paired = {Path(p["label"]).name for p in mapping["pairs"]}
    assert f"{kinds['whole_float']}_label.tiff" in paired and len(paired) == 4
    reasons = {Path(u["path"]).name: u["reason"] for u in mapping["unreadable"]}
    assert "fractional values" in reasons[f"{kinds['fractional']}_label.tiff"]
    assert "negative ids" in reasons[f"{kinds['negative']}_label.tiff"]
    # a whole-valued float label is converted, ids unchanged
    from mediar_ray.data.mapping import read_labels

    path = root / "labels" / f"{kinds['whole_float']}_label.tiff"
    converted = read_labels(str(path))
    assert converted.dtype == np.int32
    assert np.array_equal(converted, read_image(str(path)).astype(np.int64))
    # --strict: nothing written, exit 2, the two bad labels listed
    out = tmp_path / "m.json"
    assert main(["map-dataset", str(root), "-o", str(out), "--strict"]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "fractional" in err and "negative" in err
    assert main(["map-dataset", str(root), "-o", str(out)]) == 1
    assert len(json.loads(out.read_text())["pairs"]) == 4


def test_data_roots_are_checked_before_training(tmp_path, data_dir, caplog):
    """``data.roots`` (what configs/cpu_small.yaml uses) had no checks: a truncated image
    and a size-mismatched pair crashed mid-epoch, an image without a label was dropped
    without a word. Now each is listed with its reason and left out; --strict refuses."""
    from mediar_ray.train.loop import split_config_pairs

    root = tmp_path / "ds" / "dsb"
    stems = _copy(data_dir, 6, root)
    image = next((root / "images").glob(stems[0] + ".*"))
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # truncated
    phase = sorted((data_dir / "usiigaci_phase" / "images").glob("*.tif"))[0]
    mismatch = next((root / "images").glob(stems[1] + ".*"))
    mismatch.unlink()
    shutil.copy(phase, root / "images" / f"{stems[1]}.tif")  # 1022x1024 vs a DSB label
    shutil.copy(next((root / "images").glob(stems[2] + ".*")), root / "images" / "lonely.png")
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump({"name": "t", "data": {"roots": [str(root)], "holdout_every": 2}})
    )
    cfg = load_config(str(config))
    with caplog.at_level("WARNING", logger="mediar_ray.train"):
        train, held = split_config_pairs(cfg)
    used = {Path(p.image).stem for p in train + held}
    assert used == set(stems[2:])
    reasons = {
        line.split(": ", 1)[0].rsplit("/", 1)[-1]: line.split(": ", 1)[1]
        for line in (r.getMessage().removeprefix("left out: ") for r in caplog.records)
        if ": " in line
    }
    assert "not readable" in reasons[image.name]
    assert "its label is" in reasons[f"{stems[1]}.tif"]
    assert reasons["lonely.png"] == "image without label"
    strict = load_config(str(config))
    strict.data.strict = True
    from mediar_ray.io import InputError

    with pytest.raises(InputError, match="3 file.*--strict"):
        split_config_pairs(strict)


def test_mapping_with_an_undecodable_image_trains_on_the_rest(tmp_path, data_dir):
    """An undecodable image in a mapping used to stop training with "run
    discover-modalities" (which leaves that image out of the table, so cannot help).
    Now the pair is left out with its reason and the rest keep their clusters."""
    from mediar_ray.data.mapping import write_mapping
    from mediar_ray.train.loop import prepare_data

    root = tmp_path / "dsb"
    stems = _copy(data_dir, 4, root)
    mapping = tmp_path / "mapping.json"
    write_mapping(str(root), str(mapping), check=True)
    cut = next((root / "images").glob(stems[0] + ".*"))
    cut.write_bytes(cut.read_bytes()[:200])  # cut after the mapping was made
    images = [p["image"] for p in json.loads(mapping.read_text())["pairs"]]
    table = tmp_path / "modalities.json"
    table.write_text(
        json.dumps(
            {
                "version": 1,
                "unreadable": [{"image": str(cut), "reason": "not readable"}],
                "table": {u: i % 2 for i, u in enumerate(images) if u != str(cut)},
            }
        )
    )
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "data": {
                    "mappings": [str(mapping)],
                    "holdout_every": 0,
                    "modality_table": str(table),
                },
            }
        )
    )
    data = prepare_data(load_config(str(config)))
    assert sorted(Path(p.image).stem for p in data.train) == sorted(stems[1:])
    assert len(data.clusters) == 3


def test_validation_and_evaluate_score_every_good_pair(label_root, tmp_path):
    """A fractional label among the held-out pairs used to crash validation (the run
    could never pass that epoch) and ``evaluate`` (TypeError, no file named, the other
    pairs not scored). Now the good pairs are scored and the bad one listed."""
    from mediar_ray.evaluate import evaluate_dirs

    root, kinds = label_root
    # evaluate: the label folder scored against itself (the whole-valued float
    # label is converted and scores 1), the fractional and negative ones listed
    failures: list = []
    scores = evaluate_dirs(str(root / "labels"), str(root / "labels"), failures=failures)
    assert len(scores) == 4 and all(s.f1 == 1.0 for s in scores)
    assert {name for name, _ in failures} == {kinds["fractional"], kinds["negative"]}
    from mediar_ray.model import build_model
    from mediar_ray.train.validate import validate

    labels = sorted((root / "labels").glob("*_label.tiff"))
    keep = [p for p in labels if not any(s in p.name for s in kinds.values())][:2]
    keep += [root / "labels" / f"{kinds['fractional']}_label.tiff"]
    pairs = [
        Pair(str(next((root / "images").glob(p.name[:-11] + ".*"))), str(p), "dsb") for p in keep
    ]
    import torch

    torch.manual_seed(0)
    model = build_model(
        encoder_name="mit_b0", decoder_channels=[32, 16, 16, 16, 16], decoder_pab_channels=16
    )
    bad: list = []
    report = validate(model, pairs, roi_size=256, bad=bad)
    assert report["val_images"] == 2 and report["val_bad"] == 1
    assert kinds["fractional"] in bad[0].path and "fractional" in bad[0].reason
