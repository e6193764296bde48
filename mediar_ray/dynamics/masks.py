"""Network output -> cell labels: foreground, flow tracking, clustering, flow-error check.

The steps of MEDIAR's post-processing (cellpose 2-era ``compute_masks``):

1. foreground = sigmoid(logit) > ``cellprob_threshold``, holes and objects smaller than
   ``min_size`` pixels removed;
2. every foreground pixel follows flows / 5 (:func:`follow_flows`);
3. end points are counted in a histogram; seeds are bins that hold more than 10 end
   points and are the maximum of their 5x5 neighbourhood; each seed grows for 5 steps
   through 8-connected bins holding more than 2 end points (later seeds, in raster order,
   win where two grow into the same bin); a pixel takes the label of its end bin;
4. masks covering more than 90% of the image are dropped;
5. each mask's own flows are recomputed from its shape; masks whose mean squared
   difference to the predicted (flows / 5) exceeds ``flow_threshold`` are dropped,
   except that two touching failing masks that pass the check together are joined
   (our addition: a cell pinched in the middle can trap pixels in two sinks);
6. ids are renumbered 1..N.

Deviations from the original, none of which changed a cell on the reference data: pixels
stop once settled rather than after exactly ``niter`` steps; flows are sampled at pixel
centres (the original's grid_sample call shifts samples by up to half a pixel depending on
the image size, which would make a tile disagree with the whole image); a pixel's position
is its start plus a float32 offset (so its rounding, and the histogram bin it ends in, do
not depend on where a tile starts); only foreground
pixels enter the histogram and get labels; a mask's own flows in step 5 diffuse for
2 x its own extent (not the image's largest), so a cell's verdict depends on that cell
alone.

Locality (what the slide pipeline relies on): a pixel's label depends only on the network
output within ``niter`` pixels of it and of its cell, so a chunk processed with a halo of
``halo`` pixels labels every cell that lies inside the chunk shrunk by the halo exactly as
the whole image would. Rule 4 applies per call.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from scipy import ndimage
from scipy.ndimage import maximum_filter1d
from skimage.morphology import remove_small_holes, remove_small_objects

from mediar_ray.dynamics.heat import labels_to_flows, renumber
from mediar_ray.dynamics.threads import limit_threads
from mediar_ray.dynamics.tracking import follow_flows

__all__ = ["cluster_ends", "flow_errors", "flows_to_labels", "foreground", "merge_fragments"]

_RPAD = 20  # histogram margin around the image, as in the original
_SEED_MIN = 10  # a seed bin holds more than this many end points
_GROW_MIN = 2  # seeds grow through bins holding more than this many
_GROW_STEPS = 5
_MAX_AREA_FRACTION = 0.9


def foreground(
    logit: np.ndarray, cellprob_threshold: float = 0.5, min_size: int = 16
) -> np.ndarray:
    """(H, W) bool: sigmoid(logit) > threshold, small holes and objects removed."""
    z = np.asarray(logit, np.float32)
    cut = np.log(cellprob_threshold / (1.0 - cellprob_threshold))  # sigmoid(z) > t <=> z > cut
    mask = z > cut
    if min_size > 1:
        mask = remove_small_holes(mask, max_size=min_size - 1)
        mask = remove_small_objects(mask, max_size=min_size - 1)
    return mask


@nb.njit(cache=True)
def _grow_seeds(h, seeds_y, seeds_x):
    """Label map over histogram bins: each seed grown for _GROW_STEPS through h > 2."""
    H, W = h.shape
    M = np.zeros((H, W), np.int32)
    stamp = np.full((H, W), -1, np.int32)
    for k in range(seeds_y.shape[0]):
        qy = [seeds_y[k]]
        qx = [seeds_x[k]]
        stamp[seeds_y[k], seeds_x[k]] = k
        level_start = 0
        for _ in range(_GROW_STEPS):
            level_end = len(qy)
            for i in range(level_start, level_end):
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        y = qy[i] + dy
                        x = qx[i] + dx
                        if y < 0 or y >= H or x < 0 or x >= W:
                            continue
                        if stamp[y, x] == k or h[y, x] <= _GROW_MIN:
                            continue
                        stamp[y, x] = k
                        qy.append(y)
                        qx.append(x)
            level_start = level_end
        for i in range(len(qy)):
            M[qy[i], qx[i]] = k + 1
    return M


def cluster_ends(ends: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Group end points into cells.

    Parameters
    ----------
    ends : ndarray float64, (2, N)
        End positions (y, x) of the tracked pixels, inside an image of ``shape``.
    shape : (H, W)

    Returns
    -------
    ndarray int32, (N,)
        Seed label of each end point (0: reached no seed region); labels are not
        consecutive.
    """
    iy = ends[0].astype(np.int32) + _RPAD  # truncation, as the original
    ix = ends[1].astype(np.int32) + _RPAD
    hshape = (shape[0] + 2 * _RPAD, shape[1] + 2 * _RPAD)
    h = np.bincount(iy * hshape[1] + ix, minlength=hshape[0] * hshape[1])
    h = h.reshape(hshape).astype(np.int32)
    hmax = maximum_filter1d(maximum_filter1d(h, 5, axis=0), 5, axis=1)
    sy, sx = np.nonzero((h == hmax) & (h > _SEED_MIN))
    M = _grow_seeds(h, sy.astype(np.int32), sx.astype(np.int32))
    return M[iy, ix]


def flow_errors(masks: np.ndarray, flows: np.ndarray, n: int) -> np.ndarray:
    """Mean squared difference between each mask's own unit flows and ``flows``.

    Parameters
    ----------
    masks : ndarray int32, (H, W)
        Consecutive ids 1..n.
    flows : ndarray float32, (2, H, W)
        Predicted flows divided by 5 (unit scale); only its values inside masks are read.

    Returns
    -------
    ndarray float64, (n,)
        Error of mask i at index i - 1.
    """
    own = labels_to_flows(masks, per_cell_niter=True)
    # Only mask pixels are gathered: on a whole slide, full-size temporaries would cost
    # more in page faults than the arithmetic (and background pixels add nothing).
    at = np.flatnonzero(masks)
    idx = masks.ravel()[at]
    sq = np.zeros(at.size, np.float32)
    for own_c, flow_c in zip(own, flows):
        d = own_c.ravel()[at] - flow_c.ravel()[at]
        sq += d * d
    sums = np.bincount(idx, weights=sq, minlength=n + 1)[1:]
    counts = np.bincount(idx, minlength=n + 1)[1:]
    return sums / np.maximum(counts, 1)


def _union_error(masks: np.ndarray, a: int, b: int, flows: np.ndarray, boxes: list) -> float:
    """Flow error of masks a and b taken together as one cell.

    ``boxes`` are the masks' bounding boxes (``scipy.ndimage.find_objects``), so only the
    cells' own pixels are scanned, never the whole image.
    """
    (ay, ax), (by, bx) = boxes[a - 1], boxes[b - 1]
    y0, y1 = min(ay.start, by.start), max(ay.stop, by.stop)
    x0, x1 = min(ax.start, bx.start), max(ax.stop, bx.stop)
    crop = masks[y0:y1, x0:x1]
    union = ((crop == a) | (crop == b)).astype(np.int32)
    return float(flow_errors(union, flows[:, y0:y1, x0:x1], 1)[0])


def merge_fragments(
    masks: np.ndarray, errors: np.ndarray, flows: np.ndarray, threshold: float
) -> np.ndarray:
    """Join touching masks that both fail the flow check but pass it together.

    Flow tracking can leave two sinks in one cell whose shape pinches (two lobes joined
    by a narrow neck): each lobe alone disagrees with the predicted flows, the whole cell
    agrees. Only failing masks are candidates, so two real cells that touch are never
    joined. Modifies ``masks`` and ``errors`` in place and returns ``masks``.
    """
    bad = np.concatenate([[False], errors > threshold])
    pairs = []
    neighbours = (  # 8-connectivity: lobes may meet at a corner only
        (masks[:, :-1], masks[:, 1:]),
        (masks[:-1], masks[1:]),
        (masks[:-1, :-1], masks[1:, 1:]),
        (masks[:-1, 1:], masks[1:, :-1]),
    )
    for left, right in neighbours:
        touch = (left != right) & bad[left] & bad[right]
        a, b = np.minimum(left[touch], right[touch]), np.maximum(left[touch], right[touch])
        pairs.append(a.astype(np.int64) * (len(errors) + 1) + b)
    keys, border = np.unique(np.concatenate(pairs), return_counts=True)
    used = np.zeros(len(errors) + 1, bool)
    # Boxes stay right for every mask still unused: only a used pair is ever relabelled.
    boxes = ndimage.find_objects(masks, max_label=len(errors))
    for key in keys[np.argsort(-border, kind="stable")]:
        a, b = divmod(int(key), len(errors) + 1)
        if used[a] or used[b]:
            continue
        err = _union_error(masks, a, b, flows, boxes)
        if err <= threshold:
            in_b = masks[boxes[b - 1]]
            in_b[in_b == b] = a
            errors[a - 1] = err
            used[a] = used[b] = True
    return masks


def flows_to_labels(
    raw: np.ndarray,
    cellprob_threshold: float = 0.5,
    flow_threshold: float = 0.4,
    niter: int = 200,
    min_size: int = 16,
    *,
    threads: float | None = None,
) -> np.ndarray:
    """MEDIAR post-processing: network output -> instance labels.

    Parameters
    ----------
    raw : ndarray float32, (3, H, W)
        dy, dx (flows x 5, pixels) and the cell logit, as
        :func:`mediar_ray.inference.predict_raw` returns.
    cellprob_threshold : float
        On sigmoid(logit).
    flow_threshold : float
        Masks whose flow error exceeds this are dropped (0 or None: no check).
    niter : int
        Maximum tracking steps (pixels move about one pixel per step).
    min_size : int
        Foreground holes and objects smaller than this (pixels) are removed first.
    threads : float, optional
        CPUs the numba kernels may use; None: those Ray assigned to the running task or
        actor (:func:`mediar_ray.dynamics.threads.limit_threads`), all outside Ray.

    Returns
    -------
    ndarray uint32, (H, W)
        0 = background, cells 1..N.
    """
    limit_threads(threads)
    raw = np.asarray(raw, np.float32)
    if raw.ndim != 3 or raw.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) network output, got shape {raw.shape}")
    shape = raw.shape[1:]
    mask = foreground(raw[2], cellprob_threshold, min_size)
    labels = np.zeros(shape, np.uint32)
    if not mask.any():
        return labels
    # One (2, H, W) array for both uses: tracking needs zeros outside the foreground, and
    # the flow-error check reads only mask pixels, which all lie in the foreground.
    flow = raw[:2] / np.float32(5.0)
    flow *= mask
    ys, xs = np.nonzero(mask)
    ends = np.empty((2, ys.size), np.float64)
    ends[0], ends[1] = ys, xs
    moving = np.abs(flow[0, ys, xs]) > 1e-3  # the original moves only these
    ends[:, moving] = follow_flows(flow, ys[moving], xs[moving], niter)
    seeds = cluster_ends(ends, shape)
    found = np.zeros(shape, np.int32)
    found[ys, xs] = seeds
    ids, counts = np.unique(seeds, return_counts=True)
    huge = ids[(counts > _MAX_AREA_FRACTION * found.size) & (ids > 0)]
    if huge.size:
        found[np.isin(found, huge)] = 0
    masks, n = renumber(found)
    if n and flow_threshold:
        errors = flow_errors(masks, flow, n)
        masks = merge_fragments(masks, errors, flow, flow_threshold)
        keep = np.arange(n + 1, dtype=np.int32)  # int32, as masks: no int64 copy of them
        keep[1:][errors > flow_threshold] = 0
        masks, n = renumber(keep[masks])
    return masks.astype(np.uint32)
