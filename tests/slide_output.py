"""One small real slide-job output shared by the napari and SpatialData tests.

A 768 x 768 crop of the real H&E slide (CMU-1-Small-Region.svs, level 0, 0.499 um/px)
written as a tiled TIFF and run through ``mediar-ray segment-slides`` in a subprocess,
as a user runs it: the bundled model without TTA, 256-px tiles (a 3 x 3 grid, so cells
cross tile borders), a tissue mask from the real tissue detector (so ``labels/tissue``
is written), the pixel size given. Built once per test session (about a minute on two
busy cores: Ray's start, 49 windows, flow tracking) and reused.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mediar_ray.tissue import tissue_mask

MPP = 0.499
TILE = 256


@functools.cache
def build(base: Path, data_dir: Path) -> Path:
    """``base/out/he.zarr`` (the job's output root is ``base/out``)."""
    with tifffile.TiffFile(data_dir / "slides" / "CMU-1-Small-Region.svs") as tf:
        crop = tf.pages[0].asarray()[1200:1968, 600:1368]
    base.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(base / "he.tif", crop, tile=(256, 256), photometric="rgb")
    mask = tissue_mask(crop[::8, ::8])
    assert 0 < mask.mean() < 1  # some glass: the tissue layer shows something
    Image.fromarray((mask * 255).astype(np.uint8)).save(base / "tissue.png")
    cmd = [
        sys.executable,
        "-c",
        "from mediar_ray.cli import main; raise SystemExit(main())",
        "segment-slides",
        str(base / "he.tif"),
        str(base / "out"),
        "--no-tta",
        "--tile-size",
        str(TILE),
        "--halo",
        "64",
        "--mpp",
        str(MPP),
        "--tissue",
        str(base / "tissue.png"),
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base / "out" / "he.zarr"
