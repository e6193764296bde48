"""Reading every real image and label in ../shared/data, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from mediar_ray.io import (
    ImageReadError,
    expand_inputs,
    label_name,
    read_image,
    write_labels_tiff,
)


def test_every_shared_file_reads_with_documented_shape_and_dtype(data_dir):
    seen = {"png": 0, "tif": 0, "label": 0}
    for path in sorted(data_dir.glob("*/images/*")):
        image = read_image(str(path))
        if path.suffix == ".png":  # DSB2018: RGBA on disk, alpha dropped; NuInsSeg: RGB
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
            raw = np.asarray(Image.open(path))
            assert raw.shape[2] == (4 if path.parent.parent.name == "dsb2018" else 3)
            np.testing.assert_array_equal(image, raw[:, :, :3])
            seen["png"] += 1
        else:  # Usiigaci phase contrast and StarDist: grey uint16
            assert image.ndim == 2 and image.dtype == np.uint16
            np.testing.assert_array_equal(image, tifffile.imread(path))
            seen["tif"] += 1
        label = read_image(str(path.parent.parent / "labels" / label_name(path.name)))
        assert label.shape == image.shape[:2] and label.dtype == np.uint16
        seen["label"] += 1
    assert seen == {"png": 155 + 167, "tif": 16, "label": 338}


def test_svs_reads_level_zero(data_dir):
    image = read_image(str(data_dir / "slides" / "CMU-1-Small-Region.svs"))
    assert image.shape == (2967, 2220, 3) and image.dtype == np.uint8
    with tifffile.TiffFile(data_dir / "slides" / "CMU-1-Small-Region.svs") as tif:
        np.testing.assert_array_equal(image[:100, :100], tif.series[0].asarray()[:100, :100])


def test_channels_first_ome_tiff_and_float(tmp_path):
    cyx = np.random.default_rng(0).random((2, 30, 40)).astype(np.float32)
    path = tmp_path / "two_channel.ome.tif"
    tifffile.imwrite(path, cyx, metadata={"axes": "CYX"}, ome=True)
    image = read_image(str(path))
    assert image.shape == (30, 40, 2) and image.dtype == np.float32
    np.testing.assert_array_equal(image, np.moveaxis(cyx, 0, -1))


def test_rgba_png_and_bmp_jpeg(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255  # opaque: the colour itself (transparency: test_second_wave)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba[:, :, :3]).save(tmp_path / "a.bmp")
    Image.fromarray(rgba[:, :, :3]).save(tmp_path / "a.jpg")
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), rgba[:, :, :3])
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.bmp")), rgba[:, :, :3])
    assert read_image(str(tmp_path / "a.jpg")).shape == (20, 30, 3)


def test_stack_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 16, 16), np.uint16), metadata={"axes": "ZYX"})
    with pytest.raises(ImageReadError, match="stack.tif.*axes 'ZYX'"):
        read_image(str(path))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.tif", b"", "empty"),
        ("noise.png", b"not an image at all", "not a readable image"),
        ("cut.tif", None, "not a readable TIFF"),
        ("cut.png", None, "not a readable image"),
    ],
)
def test_corrupt_and_empty_files(tmp_path, data_dir, name, content, message):
    if content is None:  # a real file cut short
        src = (
            data_dir / "usiigaci_phase/images/train_set1.tif"
            if name.endswith(".tif")
            else sorted((data_dir / "dsb2018/images").glob("*.png"))[0]
        )
        data = src.read_bytes()
        content = data[: len(data) // 3]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=f"{name}.*{message}"):
        read_image(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="nope.tif: file not found"):
        read_image(str(tmp_path / "nope.tif"))


def test_label_writer_picks_the_narrowest_dtype(tmp_path):
    small = np.arange(12, dtype=np.int64).reshape(3, 4)
    big = small.copy()
    big[0, 0] = 70_000
    write_labels_tiff(small, str(tmp_path / "s_label.tiff"))
    write_labels_tiff(big, str(tmp_path / "b_label.tiff"))
    assert tifffile.imread(tmp_path / "s_label.tiff").dtype == np.uint16
    back = tifffile.imread(tmp_path / "b_label.tiff")
    assert back.dtype == np.uint32 and back[0, 0] == 70_000
    with tifffile.TiffFile(tmp_path / "b_label.tiff") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_expand_inputs_folders_globs_and_urls(data_dir, tmp_path):
    images = data_dir / "usiigaci_phase" / "images"
    from_dir = expand_inputs([str(images)])
    assert len(from_dir) == 15 and from_dir == sorted(from_dir)
    assert expand_inputs([str(images / "train_set1*.tif")]) == [
        str(images / n)
        for n in (
            "train_set1.tif",
            "train_set10.tif",
            "train_set13.tif",
            "train_set16.tif",
            "train_set19.tif",
        )
    ]
    import fsspec

    with fsspec.open("memory://bucket/in/x.tif", "wb") as f:
        f.write((images / "train_set1.tif").read_bytes())
    (url,) = expand_inputs(["memory://bucket/in"])
    assert url.startswith("memory://") and url.endswith("bucket/in/x.tif")
    assert read_image(url).shape == (1022, 1024)
    with pytest.raises(FileNotFoundError, match="no image files"):
        expand_inputs([str(tmp_path)])


def test_image_name_is_the_file_name_less_its_extension():
    from mediar_ray.io import image_name

    assert image_name("in/cell_00001.png") == "cell_00001"  # MEDIAR's name
    assert image_name("s3://b/f/a.1.png") == "a.1"  # MEDIAR would cut to "a"
    assert image_name("x.ome.tif") == "x" and image_name("x.OME.TIFF") == "x"
    assert image_name("noext") == "noext" and image_name("f/.hidden.png") == ".hidden"


def test_output_names_are_unique_deterministic_and_safe(tmp_path, monkeypatch):
    from mediar_ray.io import output_names

    urls = [
        "in/a.1.png",
        "in/a.2.png",
        "f1/slide.png",
        "f2/slide.png",
        "A.png",
        "a.tif",
        "my image.png",
        "x.ome.tif",
        "s3://bucket/f1/slide.png",
        "in/a.1.png",
    ]
    names = output_names(urls)
    assert len(names) == 9  # a.1.png listed twice keeps one name
    assert names["in/a.1.png"] == "a.1" and names["in/a.2.png"] == "a.2"
    assert names["my image.png"] == "my_image" and names["x.ome.tif"] == "x"
    # names that would clash (also ignoring case: A.png and a.tif) get a hash suffix
    for url in ("f1/slide.png", "f2/slide.png", "s3://bucket/f1/slide.png"):
        assert names[url].startswith("slide-") and len(names[url]) == len("slide-") + 8
    assert names["A.png"].startswith("A-") and names["a.tif"].startswith("a-")
    assert len({n.casefold() for n in names.values()}) == 9
    # a relative path and the absolute path of the same file get the same name
    monkeypatch.chdir(tmp_path)
    relative = output_names(urls)
    absolute = output_names([u if "://" in u else str(tmp_path / u) for u in urls])
    for u in relative:
        assert relative[u] == absolute[u if "://" in u else str(tmp_path / u)]


def test_inputs_that_fail_are_listed_with_the_others_found(data_dir, tmp_path):
    from mediar_ray.io import find_inputs

    images = data_dir / "stardist_nuclei" / "images"
    found, problems = find_inputs(
        [
            str(tmp_path / "gone.png"),
            str(images),
            "nosuchscheme://b/x.png",
            str(images / "img2d.tif"),
        ]
    )
    assert found == [str(images / "img2d.tif")]  # listed once
    why = dict(problems)
    assert why[str(tmp_path / "gone.png")].startswith("not found")
    assert why["nosuchscheme://b/x.png"].startswith("unknown URL scheme")
