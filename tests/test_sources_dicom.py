"""DICOM WSI inputs: the real SVS converted to DICOM WSI here (wsidicomizer), then read
through wsidicom: exactly equal after a lossless conversion, equal to the JPEG
re-encoding of the same tiles after a JPEG conversion; levels, pixel spacing, errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from imagecodecs import JPEG8, jpeg8_decode, jpeg8_encode
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mediar_ray.io import read_image
from mediar_ray.sources import SlideReadError, open_slide

SVS = "slides/CMU-1-Small-Region.svs"
TILE = 512
QUALITY = 90


def to_dicom(svs: str, folder, encoding, **kwargs) -> list[str]:
    """Convert ``svs`` to DICOM WSI in ``folder``, level 0 read by tiffslide (tifffile)."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder.mkdir(parents=True, exist_ok=True)
    return WsiDicomizer.convert(
        svs,
        str(folder),
        tile_size=TILE,
        encoding=encoding,
        preferred_source=SourceIdentifier.TIFFSLIDE,
        workers=1,
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def svs_pixels(data_dir):
    return read_image(str(data_dir / SVS))


@pytest.fixture(scope="module")
def dicom_jpeg(data_dir, tmp_path_factory):
    from wsidicom.codec import JpegSettings

    folder = tmp_path_factory.mktemp("dicom") / "jpeg"
    to_dicom(str(data_dir / SVS), folder, JpegSettings(quality=QUALITY), add_missing_levels=True)
    return folder


def test_lossless_dicom_equals_the_svs_pixel_for_pixel(data_dir, svs_pixels, tmp_path):
    from wsidicom.codec import Channels, JpegLosslessSettings

    # RGB kept as RGB: a YCbCr conversion would round before the lossless coding
    files = to_dicom(
        str(data_dir / SVS), tmp_path / "lossless", JpegLosslessSettings(channels=Channels.RGB)
    )
    for target in (str(tmp_path / "lossless"), files):  # a folder, or a list of its files
        with open_slide(target) as src:
            assert src.reader == "wsidicom" and src.channels == 3 and src.dtype == np.uint8
            assert src.shape == (2967, 2220) and src.mpp == pytest.approx((0.499, 0.499))
            np.testing.assert_array_equal(src.read_region(0, 0, 2967, 0, 2220), svs_pixels)
            np.testing.assert_array_equal(
                src.read_region(0, 1000, 1517, 300, 1111), svs_pixels[1000:1517, 300:1111]
            )


def test_jpeg_dicom_equals_the_jpeg_reencoding_of_the_svs_tiles(dicom_jpeg, svs_pixels):
    with open_slide(str(dicom_jpeg)) as src:
        assert src.reader == "wsidicom" and src.mpp == pytest.approx((0.499, 0.499))
        whole = src.read_region(0, 0, 2967, 0, 2220).astype(np.float64)
        # every tile that lies inside the slide is exactly its JPEG re-encoding (same
        # quality, 4:2:2 YCbCr) decoded; border tiles are padded before encoding
        for ty in range(2967 // TILE):
            for tx in range(2220 // TILE):
                ys, xs = slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE)
                tile = np.ascontiguousarray(svs_pixels[ys, xs])
                expected = jpeg8_decode(
                    jpeg8_encode(
                        tile, level=QUALITY, subsampling="422", outcolorspace=JPEG8.CS.YCbCr
                    )
                )
                np.testing.assert_array_equal(whole[ys, xs], expected)
        # and the whole slide is within JPEG error of the source (PSNR > 30 dB)
        mse = np.mean((whole - svs_pixels) ** 2)
        assert 10 * np.log10(255**2 / mse) > 30


def test_dicom_pyramid_levels_and_pixel_spacing(dicom_jpeg):
    with open_slide(str(dicom_jpeg)) as src:
        shapes = [lv.shape for lv in src.levels]
        assert shapes[:3] == [(2967, 2220), (1483, 1110), (741, 555)] or shapes[:3] == [
            (2967, 2220),
            (1484, 1110),
            (742, 555),
        ]
        assert [lv.downsample for lv in src.levels[:3]] == [
            pytest.approx((1.0, 1.0)),
            pytest.approx((2.0, 2.0)),
            pytest.approx((4.0, 4.0)),
        ]
        # a level-1 region is the level-0 region averaged 2 x 2 (up to JPEG error)
        fine = src.read_region(0, 800, 1200, 400, 800).astype(np.float64)
        coarse = src.read_region(1, 400, 600, 200, 400).astype(np.float64)
        binned = fine.reshape(200, 2, 200, 2, 3).mean(axis=(1, 3))
        assert np.abs(coarse - binned).mean() < 4


def not_wsi_dicom(path) -> None:
    """A valid DICOM file of another kind (a CT slice)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_unsupported_or_corrupt_dicom_fails_naming_the_slide(tmp_path, dicom_jpeg):
    ct = tmp_path / "ct_series"
    ct.mkdir()
    not_wsi_dicom(ct / "slice.dcm")
    with pytest.raises(SlideReadError, match="not a slide/image: .*ct_series"):
        open_slide(str(ct))
    garbage = tmp_path / "garbage_dicom"
    garbage.mkdir()
    (garbage / "x.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    with pytest.raises(SlideReadError, match="not a slide/image: .*garbage_dicom"):
        open_slide(str(garbage))
    # a real level file cut short: its header reads, its tiles do not
    level0 = max(dicom_jpeg.glob("*.dcm"), key=lambda p: p.stat().st_size)
    cut = tmp_path / "truncated"
    cut.mkdir()
    (cut / "level0.dcm").write_bytes(level0.read_bytes()[: level0.stat().st_size // 3])
    with pytest.raises(SlideReadError, match="truncated"):
        with open_slide(str(cut)) as src:
            src.read_region(0, 2400, 2967, 1700, 2220)
