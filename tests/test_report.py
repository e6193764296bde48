"""The run report, OUTPUT/report.html (issue 41).

The slow tests run a real archive job (good slides, a corrupt file, a slide of bare glass)
and open the report it writes in a real headless Chromium, as a user would: every slide
listed with the cells its summary holds, the corrupt one with its reason, the glass slide
flagged, thumbnails loaded, and no request leaving the report's folder. Every test here
fails on the code before issue 41, where no report existed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from mediar_ray.io import read_image
from mediar_ray.pipeline.report import (
    MAX_BOXES,
    PAGE_ROWS,
    RunReport,
    SlideRow,
    boxed_slides,
    flag_slides,
    render,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mediar_ray" / "assets" / "demo" / "images"
FLAGS = ["--no-tta", "--roi-size", "256", "--tile-size", "256", "--halo", "64", "--mpp", "0.5"]


def slide_data(page: str) -> list[dict]:
    """The slide rows a report embeds (the JSON its script pages through)."""
    match = re.search(
        r'<script type="application/json" id="slides-data">(.*?)</script>', page, re.S
    )
    return json.loads(match.group(1))


def synthetic_rows(n: int, seed: int = 0) -> list[SlideRow]:
    """``n`` slides with plausible figures; every 500th has 20x the usual density and
    every 1000th no cells."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cells = 0 if i % 1000 == 7 else int(rng.integers(1_000, 200_000))
        density = 2_000.0 * float(rng.lognormal(0, 0.2)) * (20 if i % 500 == 3 else 1)
        median = float(rng.uniform(20, 80))
        areas = {
            "0.05": median / 3,
            "0.25": median / 1.5,
            "0.5": median,
            "0.75": median * 1.5,
            "0.95": median * 3,
        }
        rows.append(
            SlideRow(
                name=f"slide_{i:05d}",
                status="done",
                cells=cells,
                density_per_mm2=density if cells else 0.0,
                area_um2=areas if cells else None,
                tissue_fraction=float(rng.uniform(0.05, 0.6)),
                windows_run=int(rng.integers(10, 5_000)),
                windows_skipped=10,
                seconds={"plan": 1.0, "infer": 20.0},
                qc=f"slide_{i:05d}.zarr/qc.png",
            )
        )
    rows.append(SlideRow(name="broken", status="failed", reason="SlideReadError: broken.svs"))
    return rows


def test_report_of_10000_slides_is_one_paged_file(tmp_path):
    """10,000 slides: one file of a few MB whose table is drawn a page at a time by its
    script (no <img> in the markup, so no 10,000 thumbnails load at once); every slide is
    in its data, the odd ones flagged, and the area plot keeps to its boxes."""
    rows = synthetic_rows(10_000)
    flag_slides(rows)
    page = render(
        RunReport(
            output=str(tmp_path),
            summary={
                "done": {r.name: {} for r in rows[:-1]},
                "skipped": [],
                "failed": {"broken": rows[-1].reason},
                "wall_s": 1234.5,
            },
            slides=rows,
        )
    )
    assert len(page.encode()) < 6_000_000
    assert "<img" not in page and "<link" not in page and "@import" not in page
    # Nothing to fetch: no attribute or style points at another site (the SVGs' xmlns
    # are names, not requests).
    assert not re.search(r"""(src|href)\s*=\s*["']?[a-z]+:|url\((?!#)""", page)
    data = slide_data(page)
    assert [d["name"] for d in data] == [r.name for r in rows]
    assert [d["cells"] for d in data] == [r.cells for r in rows]
    dense = {d["name"] for d in data if any("median cells per mm" in f for f in d["flags"])}
    assert dense == {f"slide_{i:05d}" for i in range(3, 10_000, 500)}
    empty = {d["name"] for d in data if "no cells" in d["flags"]}
    assert empty == {f"slide_{i:05d}" for i in range(7, 10_000, 1000)}
    boxed = boxed_slides(rows)
    assert len(boxed) <= MAX_BOXES
    assert {r.name for r in boxed} >= dense  # the flagged slides all get a box
    assert page.count("<svg") == 2
    assert "SlideReadError: broken.svs" in page


def test_names_cannot_break_out_of_the_page(tmp_path):
    """A slide name is data, never markup: '</script>' in a name stays in the JSON."""
    rows = [SlideRow(name="a</script><script>alert(1)</script>", status="done", cells=3)]
    page = render(RunReport(output=str(tmp_path), summary={}, slides=rows))
    assert slide_data(page)[0]["name"] == rows[0].name
    assert page.count("</script>") == 2  # the data's and the code's: nothing else closes one


# -- a real job, a real browser ------------------------------------------------------------
@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("job_slides", REPO / "jobs/segment_slides.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archive(src: Path) -> None:
    """Two real fields, a corrupt TIFF and a 2048 px slide of bare glass (light noise
    around the white of a glass slide, no tissue), the size at which tissue detection
    runs."""
    src.mkdir(parents=True)
    fluor = read_image(str(DEMO / "dsb_fluor_193ffaa5.png"))
    tissue = read_image(str(DEMO / "dsb_tissue_f952cc65.png"))
    Image.fromarray(fluor[:256, :320]).save(src / "fluor.png")
    Image.fromarray(tissue[:256, :320]).save(src / "tissue.png")
    (src / "corrupt.tif").write_bytes(b"II*\x00" + b"\x17" * 100)
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 3, (2048, 2048, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(glass).save(src / "glass.png")


def shown_rows(driver) -> dict[str, dict]:
    """Every row the report's table shows, page by page (name -> cells of the row)."""
    rows: dict[str, dict] = {}
    while True:
        for r in driver.execute_script(
            "return [...document.querySelectorAll('#slides-body tr')].map(tr => ({"
            "name: tr.dataset.slide, cls: tr.className, cells: [...tr.children]"
            ".map(td => td.textContent)}))"
        ):
            rows[r["name"]] = r
        info = driver.find_element("id", "page-info").text
        current, total = map(int, re.match(r"page (\d+) of (\d+)", info).groups())
        if current == total:
            return rows
        driver.find_element("id", "next").click()


@pytest.mark.slow
def test_archive_job_report_in_chromium(job, local_ray, tmp_path):
    """Issue 41, must show 3: the job writes report.html; in Chromium every slide is
    listed with its summary's cells, the corrupt one with its reason, the glass flagged,
    the thumbnails load from the slides' folders and nothing else is requested."""
    from browser import chromium, outside, requested_urls, script_errors

    from mediar_ray.cli import main

    src, out = tmp_path / "in", tmp_path / "out"
    archive(src)
    code = job.main(["--input", str(src), "--output", str(out), *FLAGS])
    assert code == 1  # the corrupt slide failed, the others are done
    run = json.loads((out / "run_summary.json").read_text())
    assert sorted(run["done"]) == ["fluor", "glass", "tissue"]
    summaries = {n: json.loads((out / f"{n}.zarr/summary.json").read_text()) for n in run["done"]}
    assert summaries["fluor"]["cells"] > 0 and summaries["tissue"]["cells"] > 0
    page = (out / "report.html").read_text()
    with chromium() as driver:
        driver.get((out / "report.html").as_uri())
        assert script_errors(driver) == []
        rows = shown_rows(driver)
        assert sorted(rows) == ["corrupt", "fluor", "glass", "tissue"]
        head = [th.text for th in driver.find_elements("css selector", "#slides th")]
        cells_col, notes_col = head.index("cells"), head.index("flags and reasons")
        for name, summary in summaries.items():
            assert rows[name]["cells"][cells_col] == f"{summary['cells']:,}"
        assert rows["corrupt"]["cls"] == "failed"
        assert run["failed"]["corrupt"] in rows["corrupt"]["cells"][notes_col]
        assert "corrupt.tif" in rows["corrupt"]["cells"][notes_col]
        failed_box = driver.find_element("id", "failed").text
        assert "corrupt" in failed_box and "corrupt.tif" in failed_box
        # The glass slide: no cell, and a tissue mask that is either empty or (as the
        # detector has it today) the whole slide: flagged for both, whichever it is.
        assert rows["glass"]["cls"] == "flagged"
        glass_notes = rows["glass"]["cells"][notes_col]
        assert "no cells" in glass_notes
        mask = np.asarray(zarr.open_array(str(out / "glass.zarr/labels/tissue/0"))[:]) > 0
        if mask.mean() >= 0.9:
            assert f"tissue covers {mask.mean():.0%} of the slide" in glass_notes
        else:
            assert mask.mean() == 0 and "no tissue found" in glass_notes
        assert rows["fluor"]["cls"] == rows["tissue"]["cls"] == ""
        loaded = driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete && "
            "i.naturalWidth > 0])"
        )
        assert sorted(loaded) == [[f"{n}.zarr/qc.png", True] for n in sorted(summaries)]
        # Sorting: a click on "cells" orders the slides by their cells, most first.
        driver.find_elements("css selector", "#slides th")[cells_col].click()
        order = [
            r
            for r in driver.execute_script(
                "return [...document.querySelectorAll('#slides-body tr')].map(tr => "
                "tr.dataset.slide)"
            )
            if r in summaries
        ]
        assert order == sorted(summaries, key=lambda n: -summaries[n]["cells"])
        urls = requested_urls(driver)
    assert (out / "report.html").as_uri() in urls
    assert outside(urls, out) == []
    # `mediar-ray report` rebuilds the same report from the folder.
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert slide_data((out / "report.html").read_text()) == slide_data(page)


@pytest.mark.slow
def test_10000_slides_page_in_chromium(tmp_path):
    """10,000 slides in a real browser: one page of rows and of thumbnail requests at a
    time, the flagged filter and paging reach every flagged slide."""
    from browser import chromium, outside, requested_urls, script_errors

    rows = synthetic_rows(10_000)
    flag_slides(rows)
    target = tmp_path / "report.html"
    target.write_text(render(RunReport(output=str(tmp_path), summary={}, slides=rows)))
    with chromium() as driver:
        driver.get(target.as_uri())
        assert script_errors(driver) == []  # the missing qc.png files are not its errors
        shown = driver.find_elements("css selector", "#slides-body tr")
        assert len(shown) == PAGE_ROWS
        images = [u for u in requested_urls(driver) if u.endswith("qc.png")]
        assert 0 < len(images) <= PAGE_ROWS
        assert "page 1 of 201 (10001 slides)" == driver.find_element("id", "page-info").text
        driver.find_element("id", "only-flagged").click()
        flagged = shown_rows(driver)
        assert set(flagged) == {r.name for r in rows if r.flags or r.status == "failed"}
        assert outside(requested_urls(driver), tmp_path) == []


def test_report_of_a_folder_without_a_job_is_a_one_line_error(tmp_path, caplog):
    """`mediar-ray report` on a folder no slide job wrote: exit code 2, naming it."""
    from mediar_ray.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert str(tmp_path) in caplog.text and "segment-slides" in caplog.text
    assert not (tmp_path / "report.html").exists()
