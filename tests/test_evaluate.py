"""``mediar-ray evaluate`` on real label files."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import tifffile

from mediar_ray.cli import main


def test_evaluate_pairs_files_and_writes_csv(data_dir, tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    labels = sorted((data_dir / "usiigaci_phase/labels").glob("*_label.tiff"))[:3]
    for path in labels:
        shutil.copy(path, gt / path.name)
    # perfect copy, one with half its cells removed, one without ground truth
    shutil.copy(labels[0], pred / labels[0].name)
    half = tifffile.imread(labels[1])
    ids = np.unique(half)[1:]
    half[np.isin(half, ids[::2])] = 0
    tifffile.imwrite(pred / labels[1].name, half)
    tifffile.imwrite(pred / "orphan_label.tiff", half)
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(pred),
                "--gt",
                str(gt),
                "--csv",
                str(tmp_path / "scores.csv"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mean" in out and labels[0].name[: -len("_label.tiff")] in out
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [r["name"] for r in rows][-1] == "mean" and len(rows) == 3
    perfect, halved = rows[0], rows[1]
    assert float(perfect["f1"]) == 1.0
    assert float(halved["precision"]) == 1.0 and 0.3 < float(halved["recall"]) < 0.7
    assert float(rows[2]["f1"]) == (1.0 + float(halved["f1"])) / 2


def test_evaluate_without_pairs_fails(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "a"), "--gt", str(tmp_path / "b")]) == 1


def test_heldout_split_of_a_config_matches_segment_then_evaluate(dsb_config, tmp_path):
    """``evaluate --config`` scores a training config's held-out pairs exactly as
    ``segment`` followed by ``evaluate --pred --gt`` scores the same files."""
    import json

    config, root = dsb_config(4)
    report = tmp_path / "held.json"
    assert main(["evaluate", "--config", str(config), "--no-tta", "--json", str(report)]) == 0
    held = json.loads(report.read_text())
    assert held["val_images"] == 2 and [i["source"] for i in held["images"]] == ["dsb"] * 2
    # the same two images through the two file-based commands
    names = [i["image"] for i in held["images"]]
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    gt.mkdir()
    for name in names:
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        shutil.copy(root / "labels" / f"{stem}_label.tiff", gt)
    assert main(["segment", *names, "--output", str(pred), "--no-tta", "--device", "cpu"]) == 0
    assert (
        main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(tmp_path / "s.csv")])
        == 0
    )
    rows = {r["name"]: float(r["f1"]) for r in csv.DictReader(open(tmp_path / "s.csv"))}
    for item in held["images"]:
        stem = item["image"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        assert item["f1"] == rows[stem]
    assert held["val_f1"] == rows["mean"] and held["val_f1_dsb"] == rows["mean"]
    assert 0.0 < held["val_f1"] <= 1.0
    # --split train scores the other half of the config's pairs, and only those
    trained = tmp_path / "train.json"
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(config),
                "--split",
                "train",
                "--no-tta",
                "--json",
                str(trained),
            ]
        )
        == 0
    )
    train_names = [i["image"] for i in json.loads(trained.read_text())["images"]]
    assert len(train_names) == 2 and not set(train_names) & set(names)
    assert {n.rsplit("/", 1)[-1] for n in train_names + names} == {
        p.name for p in (root / "images").iterdir()
    }


def test_missing_folder_is_one_line_and_exit_2(tmp_path, caplog):
    """A missing --pred or --gt folder was a traceback."""
    (tmp_path / "gt").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt")]) == 2
    assert f"--pred {tmp_path / 'nope'}: not a readable folder" in caplog.text


def test_compare_prints_both_models_per_source_and_group(data_dir, tmp_path, capsys):
    """``--compare`` scores a second model on the same pairs; ``--groups`` adds a row
    per group; the table's numbers are the per-image scores averaged."""
    import json

    import pytest
    import yaml

    from mediar_ray.model import default_weights

    root = tmp_path / "ds" / "nuinsseg"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    stems = ("human_bladder_01", "human_bladder_05", "mouse_heart_19", "mouse_heart_23")
    for stem in stems:
        shutil.copy(data_dir / f"nuinsseg/images/{stem}.png", root / "images")
        shutil.copy(data_dir / f"nuinsseg/labels/{stem}_label.tiff", root / "labels")
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump({"name": "t", "data": {"roots": [str(root)], "holdout_every": 2}})
    )
    groups = tmp_path / "groups.csv"
    groups.write_text("stem,organ\n" + "".join(f"{s},{s.rsplit('_', 1)[0]}\n" for s in stems))
    out = tmp_path / "cmp.json"
    argv = ["evaluate", "--config", str(config), "--no-tta", "--json", str(out)]
    assert main(argv + ["--compare", str(tmp_path / "missing.safetensors")]) == 2
    assert main(argv + ["--groups", str(groups), "--compare", default_weights()]) == 0
    report = json.loads(out.read_text())
    table = {row["row"]: row for row in report["table"]}
    f1 = {i["image"].rsplit("/", 1)[-1][: -len(".png")]: i["f1"] for i in report["images"]}
    assert table["all images"]["images"] == 2 == len(f1)
    assert table["all images"]["f1"] == pytest.approx(sum(f1.values()) / 2)
    for stem, score in f1.items():
        assert table[f"  nuinsseg: {stem.rsplit('_', 1)[0]}"]["f1"] == pytest.approx(score)
    # the bundled model compared with itself gives the same column twice
    for row in report["table"]:
        assert row["f1_compare"] == pytest.approx(row["f1"])
    assert "| all images | 2 |" in capsys.readouterr().out


@pytest.mark.slow  # three evaluations of two H&E fields: about a minute of CPU
def test_compare_column_is_the_other_models_own_score(data_dir, tmp_path):
    """``--compare`` with an independent model (the one bundled before H&E training):
    its column equals that model's own evaluation of the same pairs, run separately, and
    differs from this model's on H&E fields (issue 41: comparing a model with itself
    could not fail)."""
    import json
    from pathlib import Path

    import pytest
    import yaml

    other = str(Path(__file__).resolve().parents[1] / "configs/cpu_small_stage0.safetensors")
    root = tmp_path / "ds" / "nuinsseg"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("human_bladder_01", "human_bladder_05", "mouse_heart_19", "mouse_heart_23"):
        shutil.copy(data_dir / f"nuinsseg/images/{stem}.png", root / "images")
        shutil.copy(data_dir / f"nuinsseg/labels/{stem}_label.tiff", root / "labels")
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump({"name": "t", "data": {"roots": [str(root)], "holdout_every": 2}})
    )
    argv = ["evaluate", "--config", str(config), "--no-tta", "--json"]
    assert main(argv + [str(tmp_path / "cmp.json"), "--compare", other]) == 0
    assert main(argv + [str(tmp_path / "other.json"), "--weights", other]) == 0
    both = {r["row"]: r for r in json.loads((tmp_path / "cmp.json").read_text())["table"]}
    alone = {r["row"]: r for r in json.loads((tmp_path / "other.json").read_text())["table"]}
    assert both["all images"]["f1_compare"] == pytest.approx(alone["all images"]["f1"])
    assert abs(both["all images"]["f1"] - both["all images"]["f1_compare"]) > 0.01
