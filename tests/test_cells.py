"""Per-cell measurements chunk by chunk and GeoJSON outlines, against scikit-image on
the whole image: a 3072^2 mosaic of real DSB2018 images and their hand-made labels, cut
into 49 chunks of 500 px (ragged last row and column)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import shapely.geometry
from skimage.draw import polygon2mask
from skimage.measure import label as connected_pieces
from skimage.measure import regionprops

from mediar_ray.cells import (
    cells_in_several_chunks,
    finalize,
    measure_chunk,
    merge_partials,
    split_partials,
    take_rows,
    touches_neighbour,
)
from mediar_ray.cells.geojson import (
    features,
    outline_regions,
    write_feature_collection,
    write_piece,
)
from mediar_ray.io import read_image
from mediar_ray.pipeline.layout import tile_grid

SIZE, TILE, SCALE = 3072, 500, (2.0, 3.0)


def paired_mosaic(
    pairs: list[tuple[np.ndarray, np.ndarray]], size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, image) mosaics of real (image, label) pairs placed row by row in a seeded
    random order, ids made unique (the placement of bench/mosaic.py, with images)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint32)
    image = np.zeros((size, size, 3), np.uint8)
    y = x = row_h = next_id = i = 0
    order = rng.permutation(len(pairs))
    while y < size:
        img, lab = pairs[order[i % len(order)]]
        i += 1
        h, w = min(lab.shape[0], size - y), min(lab.shape[1], size - x)
        piece = lab[:h, :w].astype(np.uint32)
        fg = piece > 0
        labels[y : y + h, x : x + w][fg] = piece[fg] + next_id
        image[y : y + h, x : x + w] = img[:h, :w]
        next_id += int(lab.max())
        row_h = max(row_h, h)
        x += w
        if x >= size:
            x, y, row_h = 0, y + row_h, 0
    return labels, image


@pytest.fixture(scope="module")
def mosaic(data_dir: Path):
    pairs = []
    for path in sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff")):
        lab = read_image(str(path))
        img = read_image(str(data_dir / "dsb2018" / "images" / (path.name[:-11] + ".png")))
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        pairs.append((img, lab))
    # The densest images, so that thousands of cells cross chunk borders.
    pairs.sort(key=lambda p: len(np.unique(p[1])) / p[1].size, reverse=True)
    labels, image = paired_mosaic(pairs[:40], SIZE, seed=5)
    grey = image.astype(np.float32).mean(axis=2)
    # A cell logit with the range and dtype of the model's: positive on bright pixels.
    logit = ((grey - grey.mean()) / (grey.std() + 1e-6) * 3).astype(np.float32)
    return labels, image, logit


@pytest.fixture(scope="module")
def chunked(mosaic):
    """Measure chunk by chunk as the pipeline does: complete cells finalised per chunk,
    the others merged across chunks."""
    labels, image, logit = mosaic
    tiles = tile_grid(labels.shape, TILE)
    parts = []
    for t in tiles:
        core = (slice(t.y0, t.y1), slice(t.x0, t.x1))
        parts.append(measure_chunk(labels[core], (t.y0, t.x0), logit[core], image[core]))
    shared = cells_in_several_chunks([p.ids for p in parts])
    complete, border = zip(*(split_partials(p, shared) for p in parts))
    rows = [finalize(c, scale=SCALE, pixel_size_um=(0.25, 0.25)) for c in complete]
    merged = finalize(merge_partials(border), scale=SCALE, pixel_size_um=(0.25, 0.25))
    return tiles, parts, shared, rows, merged, border


def concat(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_chunked_measurements_equal_regionprops(mosaic, chunked):
    labels, image, logit = mosaic
    tiles, parts, shared, rows, merged, _ = chunked
    table = concat(rows + [merged])
    props = regionprops(labels.astype(np.int64), intensity_image=image)
    prob = regionprops(
        labels.astype(np.int64), intensity_image=1 / (1 + np.exp(-logit.astype(np.float64)))
    )
    order = np.argsort(table["id"])
    t = {k: v[order] for k, v in table.items()}
    # Every cell exactly once, the ones crossing chunk borders included.
    assert len(tiles) == 49 and len(shared) > 500  # hundreds of cells cross a border
    assert np.array_equal(t["id"], [p.label for p in props])
    assert np.array_equal(t["area"], [p.area for p in props])
    bbox = np.stack([t[k] for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")], axis=1)
    assert np.array_equal(bbox, [p.bbox for p in props])
    centroid = np.stack([t["centroid_y"], t["centroid_x"]], axis=1)
    assert np.abs(centroid - [p.centroid for p in props]).max() < 1e-6
    for col, attr in (
        ("intensity_mean", "intensity_mean"),
        ("intensity_min", "intensity_min"),
        ("intensity_max", "intensity_max"),
    ):
        assert np.abs(t[col] - [getattr(p, attr) for p in props]).max() < 1e-5, col
    assert np.abs(t["prob_mean"] - [p.intensity_mean for p in prob]).max() < 1e-5
    assert np.abs(t["prob_max"] - [p.intensity_max for p in prob]).max() < 1e-5
    for col in (
        "axis_major_length",
        "axis_minor_length",
        "eccentricity",
        "extent",
        "equivalent_diameter_area",
    ):
        ours = t[col.replace("_area", "")]
        assert np.allclose(ours, [getattr(p, col) for p in props], rtol=1e-9, atol=1e-9), col
    # Orientation is defined where the two axes differ; compare it there (mod pi).
    defined = t["axis_major_length"] - t["axis_minor_length"] > 1e-6
    diff = np.angle(np.exp(2j * (t["orientation"] - [p.orientation for p in props])))
    assert defined.sum() > 0.9 * defined.size and np.abs(diff[defined]).max() < 1e-9
    # Level-0 and micrometre coordinates follow from the processing ones.
    assert np.allclose(t["centroid_x_level0"], (t["centroid_x"] + 0.5) * SCALE[1] - 0.5)
    assert np.allclose(t["centroid_y_um"], t["centroid_y_level0"] * 0.25)
    assert np.allclose(t["area_um2"], t["area"] * SCALE[0] * SCALE[1] * 0.0625)


def test_merge_is_exact_in_any_order(chunked):
    *_, merged, border = chunked
    rng = np.random.default_rng(0)
    shuffled = [border[i] for i in rng.permutation(len(border))]
    # A tree of merges (as a distributed reduce would do) against one flat merge.
    halves = [merge_partials(shuffled[i : i + 5]) for i in range(0, len(shuffled), 5)]
    tree = merge_partials(halves)
    flat = merge_partials(border)
    for name in ("ids", "count", "bbox", "moments", "int_min", "int_max", "logit_max"):
        assert np.array_equal(getattr(tree, name), getattr(flat, name)), name
    assert np.allclose(tree.int_sum, flat.int_sum, rtol=1e-12)
    assert np.array_equal(
        finalize(flat, scale=SCALE, pixel_size_um=(0.25, 0.25))["id"], merged["id"]
    )


def test_shared_cells_touch_a_chunk_edge_or_have_pieces(mosaic, chunked):
    """The geometric test misses only labels with a detached piece in another chunk."""
    labels = mosaic[0]
    tiles, parts, shared, *_ = chunked
    touching = set()
    for t, p in zip(tiles, parts):
        edge = touches_neighbour(p, (t.y0, t.y1, t.x0, t.x1), labels.shape)
        touching |= set(p.ids[edge].tolist())
    detached = {c for c, n in piece_counts(labels).items() if n > 1}
    assert set(shared.tolist()) <= touching | detached
    assert len(touching) >= len(shared)


def test_geojson_outlines_in_level0_pixels(mosaic, chunked, tmp_path):
    labels = mosaic[0]
    tiles, parts, shared, rows, merged, _ = chunked
    pieces = []
    for t, r in zip(tiles, rows):  # complete cells: drawn from the chunk itself
        url = str(tmp_path / "pieces" / f"{t.name}.json")
        write_piece(
            url,
            features(
                labels[t.y0 : t.y1, t.x0 : t.x1], (t.y0, t.x0), r, scale=SCALE, slide="mosaic"
            ),
        )
        pieces.append(url)
    for k, ((y0, y1, x0, x1), idx) in enumerate(outline_regions(merged, TILE)):
        assert y1 - y0 <= 2 * TILE and x1 - x0 <= 2 * TILE  # a bounded region per group
        url = str(tmp_path / "pieces" / f"border_{k}.json")
        write_piece(
            url,
            features(
                labels[y0:y1, x0:x1], (y0, x0), take_rows(merged, idx), scale=SCALE, slide="mosaic"
            ),
        )
        pieces.append(url)
    out = tmp_path / "mosaic.geojson.gz"
    write_feature_collection(str(out), pieces)
    with gzip.open(out, "rt") as f:
        collection = json.load(f)
    feats = collection["features"]
    assert collection["type"] == "FeatureCollection"
    ids = np.array([f["properties"]["measurements"]["id"] for f in feats])
    assert np.array_equal(np.sort(ids), np.unique(labels[labels > 0]))  # one per cell
    assert len({f["id"] for f in feats}) == len(feats)
    table = concat(rows + [merged])
    area = dict(zip(table["id"].tolist(), table["area"].tolist()))
    boxes = {
        int(i): (int(a), int(b), int(c), int(d))
        for i, a, b, c, d in zip(
            table["id"], table["bbox_y0"], table["bbox_x0"], table["bbox_y1"], table["bbox_x1"]
        )
    }
    pieces_of = piece_counts(labels)
    sy, sx = SCALE
    ious, joined, holes = [], [], 0
    for f in feats:
        props = f["properties"]
        assert props["objectType"] == "detection" and f["geometry"]["type"] == "Polygon"
        cell = props["measurements"]["id"]
        assert props["measurements"]["area"] == area[cell]
        poly = shapely.geometry.shape(f["geometry"])
        assert poly.is_valid and poly.exterior.is_ccw
        assert not any(ring.is_ccw for ring in poly.interiors)
        holes += len(poly.interiors)
        # Coordinates are level-0 pixels: pixel edges scaled by (sy, sx), the polygon
        # spanning exactly the cell's box scaled to level 0.
        y0, x0, y1, x1 = boxes[cell]
        assert poly.bounds == (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        level0 = np.asarray(poly.exterior.coords)
        assert np.all(level0 % (sx, sy) == 0)
        # Rasterise it on the processing grid (a uniform scaling leaves IoU unchanged)
        # over the cell's box, holes cut out, against the cell's pixels.
        cell_px = labels[y0:y1, x0:x1] == cell
        drawn = rasterise(poly.exterior, cell_px.shape, (y0, x0), SCALE)
        for hole in poly.interiors:
            drawn &= ~rasterise(hole, cell_px.shape, (y0, x0), SCALE)
        ious.append((drawn & cell_px).sum() / (drawn | cell_px).sum())
        assert not (cell_px & ~drawn).any()  # every pixel covered (pieces joined)
        if pieces_of[cell] > 1:
            joined.append(ious[-1])
    assert min(ious) >= 0.9, min(ious)
    assert len(joined) > 10 and holes > 0  # labels in pieces and with holes were met


def rasterise(
    ring, shape: tuple[int, int], origin: tuple[int, int], scale: tuple[float, float]
) -> np.ndarray:
    """Pixels of a processing-grid region (top-left corner ``origin`` (y, x)) whose
    centres lie inside the ring ((x, y) level-0 vertices)."""
    xy = np.asarray(ring.coords)
    return polygon2mask(
        shape,
        np.stack(
            [xy[:, 1] / scale[0] - origin[0] - 0.5, xy[:, 0] / scale[1] - origin[1] - 0.5], axis=1
        ),
    )


def piece_counts(labels: np.ndarray) -> dict[int, int]:
    """Number of 4-connected pieces of every cell id."""
    pieces = connected_pieces(labels, connectivity=1)  # a piece never joins two ids
    owner = np.zeros(int(pieces.max()) + 1, np.int64)
    owner[pieces.ravel()] = labels.ravel()
    ids, counts = np.unique(owner[1:], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))
