"""Finding the slides of an archive (files, folders, globs; local and on an S3 server on
loopback) and staging remote slides to local scratch for OpenSlide."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from s3_server import environment, s3_client, s3_server

from mediar_ray.io import read_image
from mediar_ray.sources import SlideReadError, open_slide
from mediar_ray.sources.discover import find_slides
from mediar_ray.sources.staging import StagedSlides, staged

SVS = "slides/CMU-1-Small-Region.svs"
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 4000


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env, environment(env):
        client = s3_client(env, "lab")
        yield client, env


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket="lab",
                Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                Body=path.read_bytes(),
            )


@pytest.fixture(scope="module")
def archive(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder as archives hold them; returns it and the names find_slides must give."""
    root = tmp_path_factory.mktemp("archive") / "slides"
    root.mkdir()
    shutil.copy(data_dir / SVS, root / "a.svs")
    png = sorted((data_dir / "nuinsseg/images").glob("*.png"))[0]
    shutil.copy(png, root / "b c [1].png")  # spaces and glob characters in the name
    shutil.copy(png, root / "UPPER.PNG")
    (root / "._a.svs").write_bytes(APPLEDOUBLE)  # macOS metadata named like a slide
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "notes.json").write_text("{}")
    group = zarr.open_group(root / "img.zarr", mode="w", zarr_format=3)
    group.create_array("0", shape=(2, 8, 8), dtype="uint8")
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": [{"path": "0"}],
            }
        ],
    }
    zarr.open_group(root / "ngff_no_suffix", mode="w", zarr_format=2).attrs["multiscales"] = []
    (root / "dicom_slide").mkdir()
    (root / "dicom_slide" / "level0.dcm").write_bytes(b"\x00" * 128 + b"DICM")
    (root / "other").mkdir()
    shutil.copy(png, root / "other" / "deeper.png")  # not recursive
    (root / "case.mrxs").write_text("[GENERAL]\n")
    (root / "case").mkdir()  # the MRXS data folder is part of case.mrxs, no slide itself
    (root / "case" / "Slidedat.ini").write_text("[GENERAL]\n")
    (root / "case" / "Data0000.dat").write_bytes(b"\x00" * 64)
    (root / "scan.vms").write_text(
        "[Virtual Microscope Specimen]\nImageFile=scan.jpg\nMapFile=scan_map.jpg\n"
    )
    for name in ("scan.jpg", "scan_map.jpg", "standalone.jpg"):
        shutil.copy(png, root / name)
    expected = [
        "._a.svs",
        "UPPER.PNG",
        "a.svs",
        "b c [1].png",
        "case.mrxs",
        "dicom_slide",
        "img.zarr",
        "ngff_no_suffix",
        "scan.vms",
        "standalone.jpg",
    ]
    return root, expected


def names(urls: list[str]) -> list[str]:
    return [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]


def test_a_local_folder(archive):
    root, expected = archive
    found = find_slides([str(root)])
    assert found == sorted(found) and names(found) == sorted(expected)
    assert all(Path(u).parent == root for u in found)
    assert find_slides([str(root) + "/"]) == found
    # deterministic: any order or repetition of the inputs gives the same list
    assert find_slides([str(root / "a.svs"), str(root), str(root / "a.svs")]) == found


def test_literal_paths_globs_and_slide_folders(archive):
    root, _ = archive
    literal = root / "b c [1].png"
    assert find_slides([str(literal)]) == [str(literal)]  # exists: never a glob
    assert names(find_slides([str(root / "a*.svs")])) == ["a.svs"]
    assert names(find_slides([str(root / "*.zarr"), str(root / "dicom_*")])) == [
        "dicom_slide",
        "img.zarr",
    ]
    assert find_slides([str(root / "img.zarr")]) == [str(root / "img.zarr")]
    assert find_slides([str(root / "dicom_slide")]) == [str(root / "dicom_slide")]
    assert find_slides([str(root / "notes.json")]) == [str(root / "notes.json")]


def test_inputs_that_match_nothing_are_named(archive, tmp_path):
    root, _ = archive
    with pytest.raises(FileNotFoundError, match="no_such_slide.svs"):
        find_slides([str(root), str(root / "no_such_slide.svs")])
    with pytest.raises(FileNotFoundError, match=r"\*\.ndpi"):
        find_slides([str(root / "*.ndpi")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="empty: no slides found"):
        find_slides([str(tmp_path / "empty")])


def test_appledouble_file_fails_when_opened_naming_it(archive):
    root, _ = archive
    with pytest.raises(SlideReadError, match=r"not a slide/image: .*\._a\.svs"):
        open_slide(str(root / "._a.svs"))


def test_an_s3_folder_literal_names_and_globs(s3, archive):
    client, _ = s3
    root, expected = archive
    upload(client, root, "archive")
    found = find_slides(["s3://lab/archive/"])
    assert all(u.startswith("s3://lab/archive/") for u in found)
    assert names(found) == sorted(expected)
    literal = "s3://lab/archive/b c [1].png"
    assert find_slides([literal]) == [literal]
    with open_slide(literal) as src:
        np.testing.assert_array_equal(
            src[0:50, 0:60], read_image(str(root / "b c [1].png"))[:50, :60]
        )
    assert names(find_slides(["s3://lab/archive/a*.svs"])) == ["a.svs"]
    assert find_slides(["s3://lab/archive/img.zarr"]) == ["s3://lab/archive/img.zarr"]
    with pytest.raises(FileNotFoundError, match="s3://lab/archive/missing.svs"):
        find_slides(["s3://lab/archive/missing.svs"])


# ---- staging remote slides for OpenSlide ---------------------------------------------------


def test_openslide_reads_an_s3_slide_through_one_local_copy(s3, data_dir, tmp_path, monkeypatch):
    client, _ = s3
    client.put_object(Bucket="lab", Key="stage/one.svs", Body=(data_dir / SVS).read_bytes())
    cache = StagedSlides(root=str(tmp_path / "scratch"), keep=1)
    monkeypatch.setattr("mediar_ray.sources.openslide_source.staged", cache)
    local = read_image(str(data_dir / SVS))
    with open_slide("s3://lab/stage/one.svs", "openslide") as src:
        assert src.reader == "openslide" and src.mpp == pytest.approx((0.499, 0.499))
        np.testing.assert_array_equal(
            src.read_region(0, 500, 900, 100, 700), local[500:900, 100:700]
        )
        copy = next(cache.folder.rglob("one.svs"))
        assert copy.read_bytes() == (data_dir / SVS).read_bytes()
        inode = copy.stat().st_ino
    with open_slide("s3://lab/stage/one.svs", "openslide"):  # the same copy, reused
        assert next(cache.folder.rglob("one.svs")).stat().st_ino == inode
    assert cache.folder.parent == tmp_path / "scratch"  # never beside the outputs
    client.put_object(Bucket="lab", Key="stage/two.svs", Body=(data_dir / SVS).read_bytes())
    with open_slide("s3://lab/stage/two.svs", "openslide"):
        pass
    # keep=1: the older idle copy is gone, the newer one kept for the slide's next task
    assert [p.name for p in cache.folder.rglob("*.svs")] == ["two.svs"]
    cache.clear()
    assert not list((tmp_path / "scratch").glob("mediar_ray-staged-*"))


def test_multi_file_slides_are_staged_with_their_parts(s3, tmp_path):
    client, _ = s3
    parts = {
        "m/case.mrxs": b"[GENERAL]\n",
        "m/case/Slidedat.ini": b"[GENERAL]\nX=1\n",
        "m/case/Data0000.dat": bytes(range(256)),
        "m/unrelated.dat": b"no",
        "v/scan.vms": b"[Virtual Microscope Specimen]\nImageFile=scan.jpg\n"
        b"ImageFile(1,0)=scan_1.jpg\nMapFile=scan_map.jpg\n",
        "v/scan.jpg": b"a",
        "v/scan_1.jpg": b"b",
        "v/scan_map.jpg": b"c",
        "v/other.jpg": b"d",
    }
    for key, body in parts.items():
        client.put_object(Bucket="lab", Key=key, Body=body)
    cache = StagedSlides(root=str(tmp_path))
    mrxs = Path(cache.acquire("s3://lab/m/case.mrxs"))
    assert sorted(
        p.relative_to(mrxs.parent).as_posix() for p in mrxs.parent.rglob("*") if p.is_file()
    ) == ["case.mrxs", "case/Data0000.dat", "case/Slidedat.ini"]
    assert (mrxs.parent / "case" / "Data0000.dat").read_bytes() == bytes(range(256))
    vms = Path(cache.acquire("s3://lab/v/scan.vms"))
    assert sorted(p.name for p in vms.parent.iterdir()) == [
        "scan.jpg",
        "scan.vms",
        "scan_1.jpg",
        "scan_map.jpg",
    ]
    cache.release("s3://lab/m/case.mrxs")
    cache.release("s3://lab/v/scan.vms")
    cache.clear()
    assert not mrxs.exists() and not vms.exists()


def test_copies_are_removed_at_process_exit_and_after_a_killed_process(s3, data_dir, tmp_path):
    client, env = s3
    client.put_object(Bucket="lab", Key="exit/one.svs", Body=(data_dir / SVS).read_bytes())
    scratch = tmp_path / "scratch"
    # a folder left by a process that was killed (its pid no longer runs)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    orphan = scratch / f"mediar_ray-staged-{dead}-x"
    (orphan / "k").mkdir(parents=True)
    code = (
        "from mediar_ray.sources import open_slide\n"
        "from mediar_ray.sources.staging import staged\n"
        "s = open_slide('s3://lab/exit/one.svs', 'openslide')\n"
        "print(staged.folder)\n"
        "assert any(staged.folder.rglob('one.svs'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "MEDIAR_RAY_SCRATCH": str(scratch)},
    )
    assert run.returncode == 0, run.stderr
    folder = Path(run.stdout.strip().splitlines()[-1])
    assert folder.parent == scratch and not folder.exists()  # removed at exit
    assert not orphan.exists()
    assert staged.folder is None or staged.folder.parent != scratch
