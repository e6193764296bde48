"""`mediar-ray map-dataset` on temporary copies of real pairs, with broken files added."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mediar_ray.cli import main
from mediar_ray.data.mapping import check_pair, load_pairs, map_dataset, split_holdout


def _copy_pairs(data_dir: Path, source: str, n: int, dest: Path) -> list[str]:
    """Copy the first ``n`` real pairs of ``source`` into ``dest`` (MEDIAR layout)."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "labels").mkdir(exist_ok=True)
    stems = []
    for lab in sorted((data_dir / source / "labels").glob("*_label.tiff"))[:n]:
        stem = lab.name[: -len("_label.tiff")]
        shutil.copy(next((data_dir / source / "images").glob(stem + ".*")), dest / "images")
        shutil.copy(lab, dest / "labels")
        stems.append(stem)
    return stems


@pytest.fixture()
def clean_root(tmp_path: Path, data_dir: Path) -> Path:
    root = tmp_path / "clean"
    _copy_pairs(data_dir, "dsb2018", 4, root / "dsb")
    _copy_pairs(data_dir, "usiigaci_phase", 2, root / "phase")
    return root


@pytest.fixture()
def broken_root(tmp_path: Path, data_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Three good DSB pairs plus one of each problem map-dataset must report."""
    root = tmp_path / "broken"
    good = _copy_pairs(data_dir, "dsb2018", 3, root)
    images, labels = root / "images", root / "labels"
    png = next(images.glob(good[0] + ".*"))
    bad = {
        "unpaired_image": images / "lonely.png",
        "orphan_label": labels / "ghost_label.tiff",
        "empty_image": images / "empty.png",
        "corrupt_image": images / "corrupt.png",
        "size_mismatch": images / "mismatch.tif",
        "unreadable_label": labels / "badlabel_label.tiff",
    }
    shutil.copy(png, bad["unpaired_image"])
    shutil.copy(labels / f"{good[0]}_label.tiff", bad["orphan_label"])
    bad["empty_image"].write_bytes(b"")
    shutil.copy(labels / f"{good[1]}_label.tiff", labels / "empty_label.tiff")
    bad["corrupt_image"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    shutil.copy(labels / f"{good[1]}_label.tiff", labels / "corrupt_label.tiff")
    phase = sorted((data_dir / "usiigaci_phase" / "images").glob("*.tif"))[0]
    shutil.copy(phase, bad["size_mismatch"])  # 1022 x 1024, its label is a DSB one
    shutil.copy(labels / f"{good[2]}_label.tiff", labels / "mismatch_label.tiff")
    shutil.copy(png, images / "badlabel.png")
    bad["unreadable_label"].write_bytes(b"II*\x00" + b"\xff" * 40)
    return root, bad


def test_clean_root_maps_every_pair_and_exits_0(clean_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mapping.json"
    assert main(["map-dataset", str(clean_root), "--output", str(out)]) == 0
    mapping = json.loads(out.read_text())
    assert len(mapping["pairs"]) == 6 and not mapping["unpaired"] and not mapping["unreadable"]
    assert {p["source"] for p in mapping["pairs"]} == {"dsb", "phase"}
    pairs = load_pairs([str(out)])
    assert [p.image for p in pairs] == [p["image"] for p in mapping["pairs"]]
    for p in pairs:
        assert Path(p.label).name == Path(p.image).name.rsplit(".", 1)[0] + "_label.tiff"
    assert "6 pairs from 2 source(s)" in capsys.readouterr().out


def test_default_output_is_inside_the_root(clean_root: Path) -> None:
    assert main(["map-dataset", str(clean_root)]) == 0
    assert len(json.loads((clean_root / "mapping.json").read_text())["pairs"]) == 6


def test_broken_root_reports_each_problem_and_exits_1(broken_root, tmp_path: Path, capsys) -> None:
    root, bad = broken_root
    out = tmp_path / "mapping.json"
    assert main(["map-dataset", str(root), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    mapping = json.loads(out.read_text())
    assert len(mapping["pairs"]) == 3  # the good ones only
    assert sorted(Path(p).name for p in mapping["unpaired"]) == ["ghost_label.tiff", "lonely.png"]
    reasons = {Path(u["path"]).name: u["reason"] for u in mapping["unreadable"]}
    assert set(reasons) == {"empty.png", "corrupt.png", "mismatch.tif", "badlabel_label.tiff"}
    assert "label not readable" in reasons["badlabel_label.tiff"]
    assert "empty" in reasons["empty.png"]
    assert "not readable" in reasons["corrupt.png"]
    assert "1022x1024" in reasons["mismatch.tif"]
    for path in bad.values():
        assert path.name in err, f"{path.name} not reported"
    assert "image without label" in err and "label without image" in err


def test_no_check_skips_opening_files(broken_root) -> None:
    root, _ = broken_root
    mapping = map_dataset(str(root))  # the fast path training uses: empties only
    names = {Path(p["image"]).name for p in mapping["pairs"]}
    assert {"corrupt.png", "mismatch.tif"} <= names
    assert main(["map-dataset", str(root), "--no-check", "-o", str(root / "m.json")]) == 1


def test_decode_catches_truncated_pixel_data(clean_root: Path, tmp_path: Path) -> None:
    image = sorted((clean_root / "dsb" / "images").glob("*.png"))[0]
    label = clean_root / "dsb" / "labels" / (image.stem + "_label.tiff")
    cut = tmp_path / "cut.png"
    data = image.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert check_pair(str(image), str(label)) is None
    assert check_pair(str(cut), str(label)) is None  # the header alone looks fine
    path, why = check_pair(str(cut), str(label), decode=True)
    assert path == str(cut) and "not readable" in why


def test_a_colour_label_is_rejected(clean_root: Path) -> None:
    image = sorted((clean_root / "dsb" / "images").glob("*.png"))[0]
    path, why = check_pair(str(image), str(image))  # an RGBA PNG given as the label
    assert path == str(image) and "4 planes" in why  # RGBA


def test_missing_root_exits_2(tmp_path: Path) -> None:
    assert main(["map-dataset", str(tmp_path / "nothing"), "-o", str(tmp_path / "m.json")]) == 2
    (tmp_path / "flat").mkdir()
    assert main(["map-dataset", str(tmp_path / "flat"), "-o", str(tmp_path / "m.json")]) == 2


def test_real_data_maps_and_splits_by_name(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    assert main(["map-dataset", str(data_dir), "-o", str(out)]) == 0
    pairs = load_pairs([str(out)])
    assert len(pairs) == 338
    train, held = split_holdout(pairs, 5)  # every 5th of dsb, nuinsseg, usiigaci, stardist
    assert len(held) == 31 + 33 + 3 + 0 and len(train) + len(held) == 338
    assert split_holdout(list(reversed(pairs)), 5) == (train, held)


def test_map_dataset_names_images_as_segment_names_its_outputs(
    data_dir: Path, tmp_path: Path
) -> None:
    """map-dataset paired by the last dot and segment named by the first, so their pairs
    disagreed (x.ome.tif went unpaired); two images of one name were paired silently
    with one label. Now both follow io.output_names, and evaluate pairs segment's
    outputs with exactly the labels map-dataset paired."""
    import tifffile

    from mediar_ray.evaluate import pair_files
    from mediar_ray.io import output_names, read_image

    root = tmp_path / "ds"
    stems = _copy_pairs(data_dir, "dsb2018", 6, root)
    images, labels = root / "images", root / "labels"

    def rename(i: int, image: str, label: str) -> None:
        (images / f"{stems[i]}.png").rename(images / image)
        (labels / f"{stems[i]}_label.tiff").rename(labels / label)

    rename(0, "a.1.png", "a.1_label.tiff")
    rename(1, "a.2.png", "a.2_label.tiff")
    rename(2, "my image.png", "my image_label.tiff")
    tifffile.imwrite(
        images / "x.ome.tif",
        read_image(str(images / f"{stems[3]}.png")),
        ome=True,
        photometric="rgb",
    )
    (images / f"{stems[3]}.png").unlink()
    (labels / f"{stems[3]}_label.tiff").rename(labels / "x_label.tiff")
    shutil.copy(images / f"{stems[4]}.png", images / f"{stems[4]}.tif")  # same name twice
    mapping = map_dataset(str(root), check=True)
    paired = {Path(p["image"]).name: Path(p["label"]).name for p in mapping["pairs"]}
    assert paired == {
        "a.1.png": "a.1_label.tiff",
        "a.2.png": "a.2_label.tiff",
        "my image.png": "my image_label.tiff",
        "x.ome.tif": "x_label.tiff",
        f"{stems[5]}.png": f"{stems[5]}_label.tiff",
    }
    ambiguous = {Path(u["path"]).name: u["reason"] for u in mapping["unreadable"]}
    assert set(ambiguous) == {f"{stems[4]}.png", f"{stems[4]}.tif"}
    assert all("ambiguous" in why for why in ambiguous.values())
    # what `segment images/ -o pred/` writes, scored by evaluate against labels/
    names = output_names(sorted(str(p) for p in images.iterdir()))
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in mapping["pairs"]:
        shutil.copy(p["label"], pred / f"{names[p['image']]}_label.tiff")
    pairs, missing = pair_files(str(pred), str(labels))
    assert not missing
    assert {Path(t).name for _, _, t in pairs} == set(paired.values())
