"""The run report: one self-contained HTML file, ``OUTPUT/report.html``, built from what a
slide job leaves in its output root.

It reads ``run_summary.json`` (slides done, skipped and failed, with reasons; wall time;
how busy the model actors were), each slide's ``<name>.zarr/summary.json`` (cells, seconds
per stage, windows run and skipped) and the archive's cell table (area quantiles in um^2,
cells per mm^2 of tissue; :func:`mediar_ray.cells.summary.summarize_archive`). Nothing is
fetched when the file is opened: styles, script, data and plots (matplotlib SVG) are
inline, and each slide's thumbnail is a relative link to its ``qc.png``, loaded lazily
and only for the rows of the page shown, so an archive of 10,000 slides opens quickly.

:func:`collect` gathers the records, :func:`flag_slides` marks the slides that look
wrong, :func:`render` builds the HTML and :func:`write_report` does all three.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

import fsspec

from mediar_ray.io import safe_url

__all__ = [
    "FLAG_RULES",
    "RunReport",
    "SlideRow",
    "collect",
    "flag_slides",
    "render",
    "write_report",
]

log = logging.getLogger("mediar_ray.slides")

#: Why a slide is flagged: cells per mm^2 this many times above or below the archive's
#: median; a tissue mask covering at least this fraction of the slide (the detector took
#: the glass, or the slide is a crop of tissue that needed no mask).
FLAG_RULES = {"density_ratio": 3.0, "tissue_fraction": 0.9, "min_slides_for_density": 3}

#: Rows per page of the slide table (the page's thumbnails are the only ones loaded).
PAGE_ROWS = 50

#: At most this many slides get a box in the cell-area plot.
MAX_BOXES = 60


@dataclass
class SlideRow:
    """One slide of the report.

    ``status`` is ``done``, ``skipped`` (complete from an earlier run), ``failed`` or
    ``earlier`` (an output of an earlier run that this run's summary does not name);
    areas are in um^2, ``density_per_mm2`` counts cells per mm^2 of tissue (of the whole
    slide when no tissue mask was used), ``tissue_fraction`` is the share of the slide the
    tissue mask covers (None without a mask).
    """

    name: str
    status: str
    reason: str = ""
    source: str = ""
    cells: int | None = None
    density_per_mm2: float | None = None
    area_um2: dict[str, float] | None = None
    tissue_fraction: float | None = None
    windows_run: int | None = None
    windows_skipped: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    qc: str | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    """What the report shows: the run's summary (empty when the job wrote none) and one
    :class:`SlideRow` per slide."""

    output: str
    summary: dict[str, Any]
    slides: list[SlideRow]


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _tissue_fraction(
    fs: fsspec.AbstractFileSystem, root: str, info: dict | None, summary: dict
) -> float | None:
    """Share of the slide its tissue mask covers: from the cell table's metadata, else
    from the stored mask (a thumbnail-sized array)."""
    if not summary.get("tissue_mask"):
        return None
    shape = (info or {}).get("shape") or summary.get("shape")
    if info and info.get("tissue_area_px") is not None and shape:
        return float(info["tissue_area_px"]) / max(1.0, float(shape[0]) * float(shape[1]))
    try:
        import numpy as np
        import zarr

        mask = zarr.open_array(fs.get_mapper(f"{root}/labels/tissue/0"), mode="r")
        return float(np.mean(np.asarray(mask[:]) > 0))
    except Exception:  # noqa: BLE001 - a missing or unreadable mask leaves the column empty
        return None


def collect(output: str) -> RunReport:
    """The report's records for the output root ``output`` (local path or URL).

    Slides come from ``run_summary.json`` and from every ``<name>.zarr/summary.json``
    under the root; a slide the summary lists as failed keeps its reason even when an
    earlier run left outputs for it.

    Parameters
    ----------
    output : str
        The slide job's output root: a local folder or an fsspec URL.

    Returns
    -------
    RunReport
        The run's summary (empty when there is no ``run_summary.json``) and one
        :class:`SlideRow` per slide, flagged (:func:`flag_slides`).
    """
    from mediar_ray.cells.summary import summarize_archive
    from mediar_ray.cells.table import slide_infos

    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    run = _read_json(fs, f"{root}/run_summary.json") or {}
    status: dict[str, tuple[str, str]] = {}
    for name in run.get("done", {}):
        status[name] = ("done", "")
    for name in run.get("skipped", []):
        status[name] = ("skipped", run.get("notes", {}).get(name, ""))
    for name, reason in run.get("failed", {}).items():
        status[name] = ("failed", str(reason))
    found = sorted(
        p.rsplit("/", 2)[-2][: -len(".zarr")] for p in fs.glob(f"{root}/*.zarr/summary.json")
    )
    names = list(dict.fromkeys([*status, *found]))
    try:
        tables = {r["slide"]: r for r in summarize_archive(output)}
        infos = slide_infos(output)
    except Exception as err:  # noqa: BLE001 - a damaged cell table must not cost the report
        log.warning("report: cell table not read (%s: %s)", type(err).__name__, err)
        tables, infos = {}, {}
    rows = []
    for name in names:
        state, reason = status.get(name, ("earlier", ""))
        row = SlideRow(
            name=name, status=state, reason=reason, source=str(run.get("inputs", {}).get(name, ""))
        )
        summary = _read_json(fs, f"{root}/{name}.zarr/summary.json") if name in found else None
        if summary is not None and state != "failed":
            _fill_from_summary(row, summary, fs, f"{root}/{name}.zarr", infos.get(name))
        if name in tables and state != "failed":
            table = tables[name]
            row.area_um2 = table.get("area_um2")
            row.density_per_mm2 = table.get("density_per_mm2")
        rows.append(row)
    flag_slides(rows)
    return RunReport(output=safe_url(output), summary=run, slides=rows)


def _fill_from_summary(
    row: SlideRow, summary: dict, fs: fsspec.AbstractFileSystem, root: str, info: dict | None
) -> None:
    row.cells = int(summary.get("cells", 0))
    row.source = row.source or str(summary.get("slide", ""))
    windows = summary.get("windows") or {}
    row.windows_run, row.windows_skipped = windows.get("run"), windows.get("skipped")
    row.seconds = {k: float(v) for k, v in (summary.get("seconds") or {}).items()}
    row.tissue_fraction = _tissue_fraction(fs, root, info, summary)
    row.qc = f"{row.name}.zarr/qc.png"  # written with every complete slide


def flag_slides(rows: list[SlideRow], rules: dict[str, float] = FLAG_RULES) -> None:
    """Set each row's ``flags``: no cells, cells per mm^2 far from the archive's median
    (``rules["density_ratio"]`` times above or below, once ``min_slides_for_density``
    slides have a density), no tissue found, tissue covering nearly all of the slide.

    Parameters
    ----------
    rows : list of SlideRow
        The slides; their ``flags`` are replaced. Failed slides get none (their reason
        is shown instead).
    rules : dict of str -> float
        The thresholds (:data:`FLAG_RULES`).

    Examples
    --------
    >>> rows = [SlideRow("a", "done", cells=0, tissue_fraction=0.0),
    ...         SlideRow("b", "done", cells=10, tissue_fraction=0.97)]
    >>> flag_slides(rows)
    >>> rows[0].flags, rows[1].flags
    (['no cells', 'no tissue found'], ['tissue covers 97% of the slide'])
    """
    densities = [r.density_per_mm2 for r in rows if r.density_per_mm2]
    median = (
        statistics.median(densities) if len(densities) >= rules["min_slides_for_density"] else None
    )
    for r in rows:
        r.flags = []
        if r.status == "failed":
            continue
        if r.cells == 0:
            r.flags.append("no cells")
        if r.tissue_fraction is not None and r.tissue_fraction == 0:
            r.flags.append("no tissue found")
        if r.tissue_fraction is not None and r.tissue_fraction >= rules["tissue_fraction"]:
            r.flags.append(f"tissue covers {r.tissue_fraction:.0%} of the slide")
        if median and r.density_per_mm2:
            ratio = r.density_per_mm2 / median
            if ratio >= rules["density_ratio"] or ratio <= 1 / rules["density_ratio"]:
                r.flags.append(f"{ratio:.2g}x the archive's median cells per mm²")


# -- plots ---------------------------------------------------------------------------------
def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML
    return re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.S)


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.set_layout_engine("constrained")
    return fig


def boxed_slides(rows: list[SlideRow], *, max_boxes: int = MAX_BOXES) -> list[SlideRow]:
    """The slides the cell-area plot shows, by median area: all that have cells and
    areas up to ``max_boxes``; past that, the flagged ones (up to half the boxes) and an
    even spread of the others."""
    have = sorted(
        (r for r in rows if r.area_um2 and r.cells and math.isfinite(r.area_um2["0.5"])),
        key=lambda r: r.area_um2["0.5"],
    )
    if len(have) <= max_boxes:
        return have
    flagged = [r for r in have if r.flags][: max_boxes // 2]
    rest = [r for r in have if not r.flags]
    step = max(1, math.ceil(len(rest) / (max_boxes - len(flagged))))
    keep = {id(r) for r in flagged + rest[::step]}
    return [r for r in have if id(r) in keep]


def area_plot(rows: list[SlideRow], *, max_boxes: int = MAX_BOXES) -> str | None:
    """SVG: a box per slide of its cell areas (um^2; box 25-75 %, whiskers 5-95 %, line at
    the median) for the slides of :func:`boxed_slides`; None when no slide has areas."""
    have = boxed_slides(rows, max_boxes=max_boxes)
    if not have:
        return None
    stats = [
        {
            "label": r.name[:24],
            "med": r.area_um2["0.5"],
            "q1": r.area_um2["0.25"],
            "q3": r.area_um2["0.75"],
            "whislo": r.area_um2["0.05"],
            "whishi": r.area_um2["0.95"],
            "fliers": [],
        }
        for r in have
    ]
    fig = _figure(min(12.0, 2 + 0.25 * len(stats)), 3.2)
    ax = fig.add_subplot()
    ax.bxp(
        stats,
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": "#cfe0f3"},
        medianprops={"color": "#b5461d"},
    )
    ax.set_yscale("log")
    ax.set_ylabel("cell area (µm²)")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    for tick, r in zip(ax.get_xticklabels(), have):
        if r.flags:
            tick.set_color("#b5461d")
    return _svg(fig)


def density_plot(rows: list[SlideRow]) -> str | None:
    """SVG: histogram of the slides' cells per mm^2 (log scale), the median marked; None
    when fewer than two slides have a density."""
    values = [r.density_per_mm2 for r in rows if r.density_per_mm2]
    if len(values) < 2:
        return None
    import numpy as np

    fig = _figure(5.5, 2.6)
    ax = fig.add_subplot()
    lo, hi = min(values), max(values)
    bins = np.geomspace(lo * 0.9, hi * 1.1, 30) if hi > lo else 10
    ax.hist(values, bins=bins, color="#5b8fc7")
    ax.set_xscale("log")
    ax.axvline(statistics.median(values), color="#b5461d", label="archive median")
    ax.set_xlabel("cells per mm² (of tissue where a mask was used)")
    ax.set_ylabel("slides")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=8)
    return _svg(fig)


# -- HTML ----------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;
color:#1d2330}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em}
.muted{color:#667}.cards{display:flex;flex-wrap:wrap;gap:.7em}
.card{border:1px solid #d5dae3;border-radius:6px;padding:.5em .9em;min-width:8em}
.card b{display:block;font-size:1.4em}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .5em;border-bottom:1px solid #e3e6ec;
text-align:left;vertical-align:middle}th{background:#f3f5f8;position:sticky;top:0}
th.sort{cursor:pointer;user-select:none}th.sort:after{content:" \\2195";color:#99a}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.flagged{background:#fff4ec}tr.failed{background:#fdeaea}
.flag{display:inline-block;background:#b5461d;color:#fff;border-radius:3px;padding:0 .35em;
margin:1px;font-size:.85em}
img.thumb{height:56px;max-width:110px;object-fit:contain;background:#eee}
.controls{margin:.6em 0;display:flex;gap:1em;align-items:center;flex-wrap:wrap}
.plot svg{max-width:100%;height:auto}
"""

SCRIPT = """
(function(){
const rows = JSON.parse(document.getElementById('slides-data').textContent);
const PAGE = %d;
let key = 'flagged', asc = false, page = 0, onlyFlagged = false, text = '';
const body = document.getElementById('slides-body');
const fmt = (v, d) => v === null || v === undefined ? '\\u2014'
  : (typeof v === 'number' ? v.toLocaleString(undefined, {maximumFractionDigits: d}) : v);
function value(r, k){ return k === 'flagged' ? r.flags.length : r[k]; }
function visible(){
  return rows.filter(r => (!onlyFlagged || r.flags.length || r.status === 'failed')
    && (!text || r.name.toLowerCase().includes(text)));
}
function cell(tr, content, cls){
  const td = document.createElement('td');
  if (cls) td.className = cls;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  tr.appendChild(td); return td;
}
function draw(){
  const list = visible();
  list.sort((a, b) => {
    let x = value(a, key), y = value(b, key);
    if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
    const c = typeof x === 'string' ? x.localeCompare(y) : x - y;
    return asc ? c : -c;
  });
  const pages = Math.max(1, Math.ceil(list.length / PAGE));
  page = Math.min(page, pages - 1);
  body.replaceChildren();
  for (const r of list.slice(page * PAGE, (page + 1) * PAGE)) {
    const tr = document.createElement('tr');
    tr.dataset.slide = r.name;
    if (r.status === 'failed') tr.className = 'failed';
    else if (r.flags.length) tr.className = 'flagged';
    if (r.qc) {
      const a = document.createElement('a'); a.href = r.qc;
      const img = document.createElement('img');
      img.loading = 'lazy'; img.className = 'thumb'; img.alt = 'qc'; img.src = r.qc;
      a.appendChild(img); cell(tr, a);
    } else cell(tr, '');
    const name = cell(tr, r.name); name.className = 'name'; name.title = r.source || '';
    cell(tr, r.status, 'status');
    cell(tr, fmt(r.cells, 0), 'n cells');
    cell(tr, fmt(r.density_per_mm2, 0), 'n');
    cell(tr, fmt(r.median_area_um2, 1), 'n');
    const tissue = r.tissue_fraction;
    cell(tr, tissue === null ? '\\u2014' : (100 * tissue).toFixed(1) + '%%', 'n');
    cell(tr, r.windows_run === null ? '\\u2014'
      : fmt(r.windows_run, 0) + ' / ' + fmt(r.windows_skipped, 0), 'n');
    cell(tr, fmt(r.seconds, 1), 'n');
    const why = document.createElement('span');
    for (const f of r.flags) { const s = document.createElement('span'); s.className = 'flag';
      s.textContent = f; why.appendChild(s); }
    if (r.reason) why.appendChild(document.createTextNode(' ' + r.reason));
    cell(tr, why, 'notes');
    body.appendChild(tr);
  }
  document.getElementById('page-info').textContent =
    'page ' + (page + 1) + ' of ' + pages + ' (' + list.length + ' slides)';
}
document.querySelectorAll('th.sort').forEach(th => th.addEventListener('click', () => {
  const k = th.dataset.key; asc = key === k ? !asc : k === 'name'; key = k; page = 0; draw();
}));
document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); draw(); };
document.getElementById('next').onclick = () => { page += 1; draw(); };
document.getElementById('only-flagged').onchange = e => {
  onlyFlagged = e.target.checked; page = 0; draw(); };
document.getElementById('filter').oninput = e => {
  text = e.target.value.toLowerCase(); page = 0; draw(); };
draw();
})();
"""

COLUMNS = [
    ("", None),
    ("slide", "name"),
    ("status", "status"),
    ("cells", "cells"),
    ("cells / mm²", "density_per_mm2"),
    ("median area µm²", "median_area_um2"),
    ("tissue", "tissue_fraction"),
    ("windows run / skipped", "windows_run"),
    ("seconds", "seconds"),
    ("flags and reasons", "flagged"),
]


def _number(v: Any) -> Any:
    """``v`` as JSON can hold it: NaN and infinities (no cells to take a quantile of)
    become None, numpy scalars plain numbers."""
    if v is None or isinstance(v, (str, bool)):
        return v
    v = float(v)
    return v if math.isfinite(v) else None


def _row_json(r: SlideRow) -> dict[str, Any]:
    return {
        "name": r.name,
        "status": r.status,
        "reason": r.reason,
        "source": r.source,
        "cells": r.cells,
        "density_per_mm2": _number(r.density_per_mm2),
        "median_area_um2": _number(r.area_um2["0.5"]) if r.area_um2 else None,
        "tissue_fraction": _number(r.tissue_fraction),
        "windows_run": r.windows_run,
        "windows_skipped": r.windows_skipped,
        "seconds": round(sum(r.seconds.values()), 3) if r.seconds else None,
        "qc": r.qc,
        "flags": r.flags,
    }


def _script_json(obj: Any) -> str:
    """JSON safe inside a <script> element (no '</' can close it)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _cards(report: RunReport) -> str:
    s, rows = report.summary, report.slides
    util = s.get("utilization") or {}
    stages: dict[str, float] = {}
    for r in rows:
        if r.status == "done":
            for k, v in r.seconds.items():
                stages[k] = stages.get(k, 0.0) + v
    cards = [
        ("slides", len(rows)),
        ("done", len(s.get("done", {}))),
        ("skipped", len(s.get("skipped", []))),
        ("failed", len(s.get("failed", {}))),
        ("flagged", sum(1 for r in rows if r.flags)),
        ("cells", f"{sum(r.cells or 0 for r in rows if r.status != 'failed'):,}"),
    ]
    if s.get("wall_s") is not None:
        cards.append(("wall time", f"{s['wall_s']:.0f} s"))
    if util:
        cards.append(("all model actors busy", f"{util.get('all_actors_busy', 0):.0%}"))
    out = ['<div class="cards" id="glance">']
    out += [
        f'<div class="card" data-key="{html.escape(k)}"><b>{html.escape(str(v))}</b>'
        f"{html.escape(k)}</div>"
        for k, v in cards
    ]
    out.append("</div>")
    if stages:
        parts = ", ".join(f"{html.escape(k)} {v:.1f} s" for k, v in stages.items())
        out.append(f'<p id="stages">Seconds per stage, summed over the slides done: {parts}.</p>')
    if util:
        out.append(
            f'<p class="muted">{util.get("actors", "?")} model actor(s) on '
            f"{s.get('model_nodes', '?')} node(s) inferred {util.get('tiles', '?')} "
            f"tiles in {util.get('span_s', 0):.1f} s.</p>"
        )
    return "\n".join(out)


def _failed(report: RunReport) -> str:
    failed = [r for r in report.slides if r.status == "failed"]
    if not failed:
        return ""
    items = "".join(
        f'<tr><td class="name">{html.escape(r.name)}</td>'
        f'<td class="reason">{html.escape(r.reason)}</td></tr>'
        for r in failed[:500]
    )
    more = (
        f'<p class="muted">and {len(failed) - 500} more: see the table below.</p>'
        if len(failed) > 500
        else ""
    )
    return (
        f'<h2>Failed slides ({len(failed)})</h2><table id="failed"><tr><th>slide</th>'
        f"<th>reason</th></tr>{items}</table>{more}"
    )


def render(report: RunReport) -> str:
    """The report's HTML.

    Parameters
    ----------
    report : RunReport
        What :func:`collect` gathered.

    Returns
    -------
    str
        One HTML document: styles, script, data and SVG plots inline; the only URLs in
        it are the thumbnails' relative links (``<name>.zarr/qc.png``), made by the
        script for the rows of the page shown.
    """
    heads = "".join(
        f'<th class="sort" data-key="{k}">{html.escape(t)}</th>' if k else "<th></th>"
        for t, k in COLUMNS
    )
    plots = [p for p in (density_plot(report.slides), area_plot(report.slides)) if p]
    plot_html = "".join(f'<div class="plot">{p}</div>' for p in plots)
    rules = FLAG_RULES
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mediar_ray run report: {html.escape(report.output)}</title>
<style>{STYLE}</style></head><body>
<h1>Run report</h1>
<p class="muted">Output root <code>{html.escape(report.output)}</code>. Rebuild with
<code>mediar-ray report OUTPUT</code>.</p>
<h2>The run at a glance</h2>
{_cards(report)}
{_failed(report)}
<h2>Cells per slide</h2>
<p class="muted">Boxes: cell areas from 25 to 75 %, whiskers from 5 to 95 %; slide names in
red are flagged.</p>
{plot_html or '<p class="muted">No slide has cells with a known pixel size.</p>'}
<h2>Slides</h2>
<p class="muted">Flagged: no cells, no tissue found, tissue covering
{rules["tissue_fraction"]:.0%} of the slide or more, cells per mm² {rules["density_ratio"]:g}
times above or below the archive's median. Click a column to sort; a thumbnail opens the
slide's qc.png.</p>
<div class="controls"><label><input type="checkbox" id="only-flagged"> flagged and failed
only</label><input id="filter" placeholder="filter by name"><button id="prev">&larr;</button>
<span id="page-info"></span><button id="next">&rarr;</button></div>
<table id="slides"><thead><tr>{heads}</tr></thead><tbody id="slides-body"></tbody></table>
<script type="application/json" id="slides-data">{
        _script_json([_row_json(r) for r in report.slides])
    }</script>
<script>{SCRIPT % PAGE_ROWS}</script>
</body></html>
"""


def write_report(output: str) -> str:
    """Build ``OUTPUT/report.html`` from what is in ``output``.

    Parameters
    ----------
    output : str
        The slide job's output root: a local folder or an fsspec URL.

    Returns
    -------
    str
        The URL of the report written.
    """
    target = f"{output.rstrip('/')}/report.html"
    text = render(collect(output))
    with fsspec.open(target, "w", encoding="utf-8") as f:
        f.write(text)
    return target
