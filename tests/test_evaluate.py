"""``mediar-ray evaluate`` on real label files."""

from __future__ import annotations

import csv
import shutil

import numpy as np
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
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt),
                 "--csv", str(tmp_path / "scores.csv")]) == 0
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
