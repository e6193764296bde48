"""OME-Zarr inputs: NGFF 0.4 on zarr v2 and NGFF 0.5 on zarr v3, written here from the
real SVS, read locally and from an S3 server on loopback; region reads fetch only the
chunks they touch; unsupported layouts fail naming the image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from s3_server import environment, s3_client, s3_server
from zarr.storage import LocalStore, WrapperStore

from mediar_ray.io import read_image
from mediar_ray.sources import SlideReadError, open_slide
from mediar_ray.sources.omezarr import OmeZarrSource

SVS = "slides/CMU-1-Small-Region.svs"
CHUNK = 256
MPP = 0.499


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level k = level 0 subsampled by 2**k (sizes rounded up)."""
    return [image[:: 2**k, :: 2**k] for k in range(levels)]


def write_ngff(
    path: Path | str, image: np.ndarray, version: str, levels: int = 3
) -> list[np.ndarray]:
    """An RGB image as OME-Zarr, as other tools write it.

    "0.4": zarr v2, axes (c, y, x) in micrometres, "/" chunk keys, metadata in .zattrs.
    "0.5": zarr v3, axes (t, c, z, y, x) with singleton t and z in nanometres, metadata
    under attributes["ome"], plus a multiscale-level scale transformation.
    """
    levels_yxc = pyramid(image, levels)
    v2 = version == "0.4"
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if v2 else 3)
    datasets = []
    for k, level in enumerate(levels_yxc):
        cyx = np.moveaxis(level, -1, 0)
        data = cyx if v2 else cyx[None, :, None]
        lead = (3,) if v2 else (1, 3, 1)
        kwargs = (
            {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
            if v2
            else {"dimension_names": ["t", "c", "z", "y", "x"]}
        )
        arr = group.create_array(
            str(k), shape=data.shape, chunks=lead + (CHUNK, CHUNK), dtype=data.dtype, **kwargs
        )
        arr[...] = data
        f = 2.0**k
        scale = [1.0, MPP * f, MPP * f] if v2 else [1.0, 1.0, 1.0, 2 * f, 2 * f]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    space = [
        {"name": n, "type": "space", "unit": "micrometer" if v2 else "nanometer"}
        for n in ("y", "x")
    ]
    axes = (
        [{"name": "c", "type": "channel"}] + space
        if v2
        else [
            {"name": "t", "type": "time"},
            {"name": "c", "type": "channel"},
            {"name": "z", "type": "space", "unit": "nanometer"},
        ]
        + space
    )
    multiscale = {"version": version, "name": "svs", "axes": axes, "datasets": datasets}
    if not v2:  # level-0 scale 2 nm times 249.5 = 499 nm = 0.499 um
        multiscale["coordinateTransformations"] = [
            {"type": "scale", "scale": [1.0, 1.0, 1.0, MPP * 1000 / 2, MPP * 1000 / 2]}
        ]
    if v2:
        group.attrs["multiscales"] = [multiscale]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return levels_yxc


@pytest.fixture(scope="module")
def svs_pixels(data_dir):
    return read_image(str(data_dir / SVS))


@pytest.fixture(scope="module")
def ngff(svs_pixels, tmp_path_factory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("ngff")
    return {
        v: (root / f"svs_{v}.zarr", write_ngff(root / f"svs_{v}.zarr", svs_pixels, v))
        for v in ("0.4", "0.5")
    }


def check_pixels(src, levels: list[np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for k, level in enumerate(levels):
        h, w = level.shape[:2]
        for _ in range(4):
            y0, x0 = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
            y1, x1 = (
                int(rng.integers(y0 + 1, min(h, y0 + 600))),
                int(rng.integers(x0 + 1, min(w, x0 + 600))),
            )
            np.testing.assert_array_equal(src.read_region(k, y0, y1, x0, x1), level[y0:y1, x0:x1])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ngff_image_reads_like_the_svs(ngff, data_dir, svs_pixels, version):
    path, levels = ngff[version]
    with open_slide(str(path)) as src:
        assert src.reader == "ome-zarr" and src.channels == 3 and src.dtype == np.uint8
        assert [lv.shape for lv in src.levels] == [(2967, 2220), (1484, 1110), (742, 555)]
        # downsamples from the scale transformations (exactly 2, 4), not the rounded sizes
        assert [lv.downsample for lv in src.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        assert src.mpp == pytest.approx((MPP, MPP))
        with open_slide(str(data_dir / SVS)) as svs:
            for y0, y1, x0, x1 in ((0, 2967, 0, 2220), (1000, 1300, 700, 1100)):
                np.testing.assert_array_equal(
                    src.read_region(0, y0, y1, x0, x1), svs.read_region(0, y0, y1, x0, x1)
                )
        check_pixels(src, levels, seed=int(version[-1]))


class RecordingStore(WrapperStore):
    """A zarr store that records every key read through it."""

    def __init__(self, store, keys: list[str] | None = None) -> None:
        super().__init__(store)
        self.keys = [] if keys is None else keys

    def _with_store(self, store):
        return type(self)(store, self.keys)

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.keys.extend(k for k, _ in key_ranges)
        return await super().get_partial_values(prototype, key_ranges)


def touched_chunks(level: int, y0: int, y1: int, x0: int, x1: int, version: str) -> set[str]:
    rows = range(y0 // CHUNK, math.ceil(y1 / CHUNK))
    cols = range(x0 // CHUNK, math.ceil(x1 / CHUNK))
    if version == "0.4":  # v2 keys with "/" separator: level/c/y/x
        return {f"{level}/0/{r}/{c}" for r in rows for c in cols}
    return {f"{level}/c/0/0/0/{r}/{c}" for r in rows for c in cols}  # v3 default keys


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_region_read_fetches_only_the_chunks_it_touches(ngff, version):
    path, levels = ngff[version]
    store = RecordingStore(LocalStore(str(path), read_only=True))
    src = OmeZarrSource(str(path), store=store)
    for level, (y0, y1, x0, x1) in [
        (0, (300, 700, 100, 400)),
        (0, (256, 512, 512, 768)),
        (1, (1000, 1484, 1000, 1110)),
        (2, (5, 6, 7, 8)),
    ]:
        store.keys.clear()
        region = src.read_region(level, y0, y1, x0, x1)
        np.testing.assert_array_equal(region, levels[level][y0:y1, x0:x1])
        data_keys = [
            k for k in store.keys if not k.rsplit("/", 1)[-1].startswith((".z", "zarr.json"))
        ]
        assert sorted(data_keys) == sorted(touched_chunks(level, y0, y1, x0, x1, version))


def test_bioformats2raw_layout_reads_its_first_image(svs_pixels, tmp_path):
    root = tmp_path / "b2r.zarr"
    zarr.open_group(str(root), mode="w", zarr_format=2).attrs["bioformats2raw.layout"] = 3
    levels = write_ngff(root / "0", svs_pixels[:600, :500], "0.4", levels=2)
    with open_slide(str(root)) as src:
        assert src.shape == (600, 500) and src.mpp == pytest.approx((MPP, MPP))
        check_pixels(src, levels, seed=3)


def test_unsupported_zarr_layouts_fail_naming_the_image(tmp_path, svs_pixels):
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(SlideReadError, match="not a slide/image: .*empty.zarr"):
        open_slide(str(empty))
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", shape=(10, 10), dtype="uint8")
    with pytest.raises(SlideReadError, match="plain.zarr.*multiscales"):
        open_slide(str(plain))
    stack = tmp_path / "stack.zarr"
    group = zarr.open_group(str(stack), mode="w", zarr_format=3)
    group.create_array("0", shape=(3, 64, 64), dtype="uint16")
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "z", "type": "space"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": [{"path": "0"}],
            }
        ],
    }
    with pytest.raises(SlideReadError, match=r"stack.zarr.*z=3"):
        open_slide(str(stack))
    # no units on the axes: the pixel size is unknown, not 1 um
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "z", "type": "space"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}],
                    }
                ],
            }
        ],
    }
    group.create_array("0", shape=(1, 64, 64), dtype="uint16", overwrite=True)
    with open_slide(str(stack)) as src:
        assert (
            src.mpp is None and src.channels == 1 and src.read_region(0, 0, 4, 0, 4).shape == (4, 4)
        )


def test_ngff_images_on_s3(ngff, svs_pixels):
    with s3_server() as env, environment(env):
        client = s3_client(env, "lab")
        for path, _ in ngff.values():
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    client.put_object(
                        Bucket="lab",
                        Key=f"zarr/{path.name}/{f.relative_to(path).as_posix()}",
                        Body=f.read_bytes(),
                    )
        for path, levels in ngff.values():
            with open_slide(f"s3://lab/zarr/{path.name}") as src:
                assert src.reader == "ome-zarr" and src.mpp == pytest.approx((MPP, MPP))
                assert [lv.downsample for lv in src.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
                np.testing.assert_array_equal(
                    src.read_region(0, 1000, 1300, 700, 1100), svs_pixels[1000:1300, 700:1100]
                )
                check_pixels(src, levels, seed=5)
