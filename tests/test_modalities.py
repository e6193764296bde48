"""Modality discovery on the real images: coverage, determinism, meaningful clusters."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mediar_ray.cli import main
from mediar_ray.data.mapping import load_pairs
from mediar_ray.data.modalities import (
    STAT_FEATURES,
    StatisticsEmbedder,
    embed_images,
    image_statistics,
    kmeans,
    load_modality_table,
    standardise,
    write_modality_table,
)

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def embedded(data_dir: Path):
    """Image statistics of every other real DSB2018 image (78: fluorescence, colour
    tissue and brightfield), read once for the module."""
    pairs = load_pairs(roots=[str(data_dir / "dsb2018")])[::2]
    urls, features, bad = embed_images(
        [p.image for p in pairs], StatisticsEmbedder(128), progress=False
    )
    assert not bad and len(urls) == 78
    return pairs, urls, standardise(features)


def _categories(data_dir: Path, pairs) -> dict[str, str]:
    """Image URL -> DSB2018 category (fluor, color, brightfield_gray) for DSB images."""
    with open(data_dir / "dsb2018" / "categories.csv") as f:
        cat = {row["stem"]: row["category"] for row in csv.DictReader(f)}
    return {p.image: cat[Path(p.image).stem] for p in pairs}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_fluorescence_and_colour_tissue_fall_in_different_clusters(embedded, data_dir, k):
    pairs, urls, features = embedded
    labels = dict(zip(urls, kmeans(features, k, seed=0)))
    cats = _categories(data_dir, pairs)
    fluor = [labels[u] for u, c in cats.items() if c == "fluor"]
    colour = [labels[u] for u, c in cats.items() if c == "color"]
    assert len(fluor) > 25 and len(colour) > 35
    # Fraction of (fluorescence, colour) image pairs put in different clusters.
    apart = np.mean(np.not_equal.outer(np.array(fluor), np.array(colour)))
    assert apart >= 0.9, apart
    assert len(set(labels.values())) == k


def test_kmeans_is_seeded_and_numbered_by_size(embedded) -> None:
    _, _, features = embedded
    a, b = kmeans(features, 6, seed=3), kmeans(features, 6, seed=3)
    np.testing.assert_array_equal(a, b)
    sizes = np.bincount(a)
    assert len(sizes) == 6 and (np.diff(sizes) <= 0).all()


def test_kmeans_clamps_k_to_distinct_images() -> None:
    features = np.array([[0.0, 1.0], [0.0, 1.0], [5.0, 5.0], [9.0, 0.0]])
    labels = kmeans(features, 40)
    assert len(np.unique(labels)) == 3 and labels[0] == labels[1]
    assert kmeans(features[:1], 40).tolist() == [0]


def test_image_statistics_tell_grey_from_colour() -> None:
    grey = np.repeat(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(1, 64, 64), 3, 0)
    colour = grey.copy()
    colour[0] *= 0.2  # little red
    g, c = image_statistics(grey), image_statistics(colour)
    assert g.shape == (len(STAT_FEATURES),)
    sat = STAT_FEATURES.index("saturation")
    assert g[sat] == pytest.approx(0.0) and c[sat] > 0.2
    assert c[STAT_FEATURES.index("red_minus_green")] < -0.2


@pytest.fixture(scope="module")
def small_root(tmp_path_factory, data_dir: Path) -> Path:
    """Ten DSB pairs (fluorescence and colour) and two phase-contrast pairs."""
    root = tmp_path_factory.mktemp("mods")
    for source, n, dest in (("dsb2018", 10, "dsb"), ("usiigaci_phase", 2, "phase")):
        (root / dest / "images").mkdir(parents=True)
        (root / dest / "labels").mkdir()
        for lab in sorted((data_dir / source / "labels").glob("*_label.tiff"))[:n]:
            stem = lab.name[: -len("_label.tiff")]
            shutil.copy(
                next((data_dir / source / "images").glob(stem + ".*")), root / dest / "images"
            )
            shutil.copy(lab, root / dest / "labels")
    return root


def test_cli_table_covers_every_image_and_is_deterministic(
    small_root: Path, tmp_path: Path
) -> None:
    mapping = tmp_path / "mapping.json"
    assert main(["map-dataset", str(small_root), "-o", str(mapping)]) == 0
    out = tmp_path / "t1.json"
    assert (
        main(["discover-modalities", str(mapping), "-k", "3", "--size", "128", "-o", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    images = [p.image for p in load_pairs([str(mapping)])]
    # keys relative to the data root, so the table works from any checkout
    assert sorted(doc["table"]) == sorted(str(Path(i).relative_to(small_root)) for i in images)
    assert doc["k"] == 3 and doc["method"] == "image-stats"
    assert sum(doc["sizes"].values()) == len(images)
    assert set(doc["table"].values()) == {0, 1, 2}
    # A second run, from the dataset root instead of the mapping, gives the same table
    # (same image URLs, same seeded clusters).
    again = tmp_path / "t2.json"
    assert (
        main(
            ["discover-modalities", str(small_root), "--k", "3", "--size", "128", "-o", str(again)]
        )
        == 0
    )
    assert json.loads(again.read_text())["table"] == doc["table"]


def test_encoder_embedding_from_a_checkpoint(small_root: Path, tmp_path: Path) -> None:
    from mediar_ray.data.modalities import EncoderEmbedder, discover_modalities
    from mediar_ray.model import build_model, save_model

    ckpt = tmp_path / "tiny.safetensors"
    save_model(
        build_model(
            encoder_name="mit_b0", decoder_channels=[32, 16, 16, 16, 16], decoder_pab_channels=16
        ),
        str(ckpt),
    )
    images = sorted(str(p) for p in (small_root / "dsb" / "images").iterdir())[:4]
    embed = EncoderEmbedder(str(ckpt), size=64)
    vec = embed(np.random.default_rng(0).random((3, 80, 90), dtype=np.float32))
    assert vec.shape == (256,) and np.linalg.norm(vec) == pytest.approx(1.0)
    doc = discover_modalities(images, k=40, checkpoint=str(ckpt), size=64, progress=False)
    assert doc["method"] == "encoder" and doc["checkpoint"] == str(ckpt)
    assert doc["k"] == 4 and sorted(doc["table"]) == images  # k clamped to 4 images


def test_unreadable_images_are_left_out_and_reported(
    small_root: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "with_bad"
    shutil.copytree(small_root / "dsb", root)
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    shutil.copy(next((root / "labels").iterdir()), root / "labels" / "bad_label.tiff")
    out = tmp_path / "t.json"
    assert main(["discover-modalities", str(root), "-k", "2", "--size", "64", "-o", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert len(doc["table"]) == 10 and not any("bad.png" in u for u in doc["table"])
    assert [Path(u["image"]).name for u in doc["unreadable"]] == ["bad.png"]
    assert main(["discover-modalities", str(tmp_path / "none"), "-o", str(out)]) == 2


def test_load_modality_table(tmp_path: Path, monkeypatch) -> None:
    doc = {"table": {str(tmp_path / "x" / "images" / "a.png"): 0, "s3://b/images/c.png": 2}}
    write_modality_table(doc, str(tmp_path / "t.json"))
    table = load_modality_table(str(tmp_path / "t.json"))
    assert table["s3://b/images/c.png"] == 2 and "s3://b/images/a.png" not in table
    monkeypatch.chdir(tmp_path)
    # Other spellings of the same local file find the same entry.
    assert "x/../x/images/a.png" in table and table["./x/images/a.png"] == 0
    assert table.get("x/images/missing.png") is None
    # Keys relative to a data root match any path that ends with them.
    write_modality_table(
        {"table": {"dsb/images/a.png": 1, "images/a.png": 2}}, str(tmp_path / "r.json")
    )
    relative = load_modality_table(str(tmp_path / "r.json"))
    assert relative["/elsewhere/data/dsb/images/a.png"] == 1  # the longest key wins
    assert relative["s3://bucket/other/images/a.png"] == 2
    assert "/data/dsb/images/b.png" not in relative and "a.png" not in relative
    for bad in ({"table": {"a": "one"}}, {"sizes": {}}, [1, 2], {"table": {"a": -1}}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="not a modality table"):
            load_modality_table(str(tmp_path / "bad.json"))
    (tmp_path / "junk.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_modality_table(str(tmp_path / "junk.json"))


def test_training_data_takes_clusters_from_the_table(
    small_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """The trainer's data preparation finds every training image in a table written
    from an absolute root while the config names the root relatively."""
    from mediar_ray.train.config import TrainConfig
    from mediar_ray.train.loop import prepare_data

    table = tmp_path / "modalities.json"
    assert (
        main(["discover-modalities", str(small_root), "-k", "3", "--size", "64", "-o", str(table)])
        == 0
    )
    monkeypatch.chdir(small_root.parent)
    cfg = TrainConfig.from_dict(
        {
            "name": "t",
            "data": {
                "roots": [f"./{small_root.name}/../{small_root.name}"],
                "holdout_every": 4,
                "modality_table": str(table),
            },
        }
    )
    data = prepare_data(cfg)
    written = load_modality_table(str(table))
    assert len(data.train) == 10 and len(data.held) == 2
    assert data.clusters.tolist() == [written[p.image] for p in data.train]


def test_committed_table_covers_the_data_from_any_checkout(data_dir: Path, tmp_path: Path) -> None:
    """configs/cpu_small_modalities.json was keyed by /work/main/../shared/data/...:
    a clone elsewhere, whose ../shared is another path to the same data, found no image
    in it. Its keys are now relative to the data root."""
    from mediar_ray.data.mapping import load_pairs

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir)
    table = load_modality_table(str(repo / "configs" / "cpu_small_modalities.json"))
    images = [p.image for p in load_pairs(roots=[str(tmp_path / "shared" / "data")])]
    assert len(images) == len(table) and all(i in table for i in images)
