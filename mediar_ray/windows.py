"""Where the sliding windows of an image lie: their starts per axis (as MONAI places
them), the augmentation frames, and which region of an image owns which window.

Pure integer geometry, no torch: the planning and gathering stages of the slide job use
it without loading the model code (:mod:`mediar_ray.inference` runs the windows).
"""

from __future__ import annotations

__all__ = [
    "BACKGROUND",
    "TTA_FRAMES",
    "frames",
    "image_starts",
    "owned",
    "owned_window_count",
    "owned_windows",
    "pad_before",
    "partial_extent",
    "window_starts",
]

#: (flip rows?, flip columns?) for identity, horizontal flip, vertical flip; the order in
#: which the original averages them.
TTA_FRAMES = ((False, False), (False, True), (True, False))

#: What a skipped window predicts: no flow, and a cell logit far below zero
#: (sigmoid(-10) = 4.5e-5), i.e. certain background.
BACKGROUND = (0.0, 0.0, -10.0)


def window_starts(length: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of sliding windows along one axis, as MONAI places them.

    ``length`` is the (padded) axis length, at least ``roi``. Windows step by
    ``int(roi * (1 - overlap))`` (at least 1; one window if ``length == roi``) and the
    last one is shifted back to end at ``length``.

    Examples
    --------
    >>> window_starts(1000, 256, 0.6)
    [0, 102, 204, 306, 408, 510, 612, 714, 744]
    """
    if length < roi:
        raise ValueError(f"axis length {length} is smaller than the window {roi}")
    if length == roi:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    starts = []
    for k in range(length):
        start = k * step
        starts.append(min(start, length - roi))
        if start + roi >= length:
            break
    return starts


def pad_before(length: int, roi: int) -> int:
    """Constant padding MONAI puts before an axis shorter than the window."""
    return max(roi - length, 0) // 2


def image_starts(length: int, roi: int, overlap: float, flipped: bool) -> list[int]:
    """Window starts along one axis in *image* coordinates, in the frame's scan order.

    The frame is the image (``flipped=False``) or the image flipped along this axis,
    padded as MONAI pads it (:func:`pad_before`) and scanned by :func:`window_starts`.
    A start ``a`` means the window covers image pixels ``a .. a + roi - 1`` (negative or
    beyond ``length`` where the window lies in the padding).

    Examples
    --------
    An axis of 200 px under a 256-px window: one window, 28 px of it in the padding.

    >>> image_starts(200, 256, 0.6, flipped=False)
    [-28]
    """
    pad = pad_before(length, roi)
    starts = window_starts(max(length, roi), roi, overlap)
    if flipped:  # frame pixel u is image pixel length - 1 - (u - pad)
        return [length - s - roi + pad for s in starts]
    return [s - pad for s in starts]


def frames(tta: bool) -> tuple[tuple[bool, bool], ...]:
    """(flip rows?, flip columns?) of each augmentation frame: the identity, then with
    ``tta`` the horizontal and the vertical flip, in the order the original averages."""
    return TTA_FRAMES if tta else TTA_FRAMES[:1]


def partial_extent(
    image_shape: tuple[int, int], region: tuple[int, int, int, int], roi_size: int = 512
) -> tuple[int, int, int, int]:
    """Pixels (y0, y1, x0, x1), half-open, that the windows owned by ``region`` cover.

    A window is owned by the region holding its top-left corner (clipped into the image),
    so it reaches at most ``roi_size - 1`` pixels beyond the region's bottom and right
    edges, and never above or left of it.
    """
    h, w = (int(v) for v in image_shape)
    y0, y1, x0, x1 = (int(v) for v in region)
    return y0, min(y1 + roi_size - 1, h), x0, min(x1 + roi_size - 1, w)


def owned(starts: list[int], length: int, lo: int, hi: int) -> list[int]:
    """Window starts whose corner, clipped into ``[0, length)``, lies in ``[lo, hi)``."""
    return [a for a in starts if lo <= min(max(a, 0), length - 1) < hi]


def owned_windows(
    image_shape: tuple[int, int],
    region: tuple[int, int, int, int],
    tta: bool,
    roi_size: int = 512,
    overlap: float = 0.6,
) -> list[tuple[bool, bool, list[int], list[int], list[tuple[int, int]]]]:
    """Per augmentation frame: (flip rows?, flip columns?, every window start along y and
    along x in image coordinates, the (y, x) corners of the windows ``region`` owns)."""
    h, w = (int(v) for v in image_shape)
    y0, y1, x0, x1 = (int(v) for v in region)
    out = []
    for fy, fx in frames(tta):
        ys, xs = image_starts(h, roi_size, overlap, fy), image_starts(w, roi_size, overlap, fx)
        mine = [(y, x) for y in owned(ys, h, y0, y1) for x in owned(xs, w, x0, x1)]
        out.append((fy, fx, ys, xs, mine))
    return out


def owned_window_count(
    image_shape: tuple[int, int],
    region: tuple[int, int, int, int],
    tta: bool,
    roi_size: int = 512,
    overlap: float = 0.6,
) -> int:
    """How many windows ``region`` owns over all augmentation frames (each counted once
    per frame): the windows :func:`mediar_ray.inference.predict_partial` runs or skips
    for it."""
    return sum(len(f[4]) for f in owned_windows(image_shape, region, tta, roi_size, overlap))
