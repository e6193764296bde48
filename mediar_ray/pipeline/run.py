"""Whole-slide segmentation of an archive on Ray: checks, then the archive engine.

Before any slide is touched, the options are validated, the output root is probed for
writing, the cluster is checked for the resources the model actors ask for, and the
weights are loaded once on the driver (strict key check) and hashed. Then one
:class:`~mediar_ray.pipeline.engine.ArchiveRun` segments every slide: each slide
``<name>`` becomes ``OUTPUT/<name>.zarr``, complete when ``.mediar_complete`` exists
(written last). A rerun skips complete slides made with the same input, options and
weights, reuses matching unfinished state, and redoes the rest. A slide that fails is
logged and reported in ``OUTPUT/run_summary.json``; the others finish.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mediar_ray.io import output_names
from mediar_ray.pipeline.cluster import check_resources, ensure_ray
from mediar_ray.pipeline.engine import ArchiveRun
from mediar_ray.io import safe_url
from mediar_ray.pipeline.options import SlideOptions
from mediar_ray.pipeline.plan import plan_slide
from mediar_ray.pipeline.provenance import fingerprint, input_identity
from mediar_ray.pipeline.report import write_report

__all__ = ["SlideOptions", "check_weights", "plan_slide", "run_slides", "slide_fingerprint"]

log = logging.getLogger("mediar_ray.slides")


def check_output_root(output: str) -> None:
    """Fail early, and clearly, when the output root cannot be written."""
    probe = f"{output.rstrip('/')}/.mediar_write_probe"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        if isinstance(fs, LocalFileSystem):  # a local root may be created; a bucket never
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except Exception as err:
        raise PermissionError(
            f"cannot write to the output root {safe_url(output)} ({type(err).__name__}: "
            f"{err}); check that the bucket/folder exists and that the credentials in the "
            "environment allow writing there"
        ) from None


def check_weights(opts: SlideOptions) -> list[str]:
    """The SHA-256 hashes of the checkpoints (part of every slide's fingerprint), after
    resolving ``opts.weights`` (none: the bundled model) and ``opts.roi_size`` (None: the
    weights' own window size); raises
    a :class:`~mediar_ray.weights.CheckpointError` naming a file that cannot be read.

    Whether they fit the model (strict keys and shapes) is checked by the model actors
    as they load them, before any slide is planned (:class:`.engine.ArchiveRun`): the
    driver never imports the model code.
    """
    from mediar_ray.weights import checkpoint_sha256, resolve_weights, window_size

    opts.weights = resolve_weights(opts.weights)
    opts.roi_size = opts.roi_size or window_size(opts.weights)
    return [checkpoint_sha256(w) for w in opts.weights]


def slide_fingerprint(url: str, opts: SlideOptions, weight_hashes: list[str],
                      mpp: float | None = None) -> dict:
    """The fingerprint a run with ``opts`` gives slide ``url`` (see :mod:`.provenance`);
    ``mpp`` is the slide's pixel-size override (--mpp or its --mpp-csv row)."""
    return fingerprint(input_identity(url), {**opts.result_options(), "mpp": mpp},
                       weight_hashes)


def pixel_size_overrides(urls: list[str], opts: SlideOptions) -> dict[str, float | None]:
    """Each slide's pixel-size override: ``--mpp`` for all, else its ``--mpp-csv`` row."""
    from mediar_ray.scale import load_mpp_table, lookup_mpp

    if opts.mpp is not None or not opts.mpp_csv:
        return {url: opts.mpp for url in urls}
    table = load_mpp_table(opts.mpp_csv)
    return {url: lookup_mpp(table, url) for url in urls}


def find_inputs(inputs: list[str]) -> list[str]:
    """Slide URLs of files, folders and globs (:func:`mediar_ray.sources.discover.find_slides`)."""
    from mediar_ray.sources.discover import find_slides

    return find_slides(inputs)


def own_outputs(urls: list[str], output: str) -> list[str]:
    """The inputs that are outputs of this job: ``<name>.zarr`` folders right under the
    output root holding a completion marker, scratch state or labels (an input folder
    that is also the output folder lists them beside the images)."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    own = []
    for url in urls:
        path = fsspec.core.url_to_fs(url)[1].rstrip("/")
        if path.endswith(".zarr") and path.rsplit("/", 1)[0] == root and any(
                fs.exists(f"{path}/{p}") for p in (".mediar_complete", ".scratch", "labels/cells")):
            own.append(url)
    return own


def _write_json(url: str, obj: dict) -> None:
    with fsspec.open(url, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def run_slides(inputs: list[str], output: str, opts: SlideOptions) -> dict[str, Any]:
    """Segment every slide of ``inputs`` into ``output``; returns the run summary, which
    is also written to ``OUTPUT/run_summary.json``.

    Raises
    ------
    OptionError, ResourceError, PermissionError, FileNotFoundError, CheckpointError
        Before any slide is touched: bad options, resources the cluster cannot provide,
        an unwritable output root, no inputs, unreadable weights.
    """
    started = time.perf_counter()
    opts.validate()
    ensure_ray(dashboard=False)
    check_output_root(output)
    wait = check_resources(opts)
    hashes = check_weights(opts)
    urls = find_inputs(inputs)
    ignored = own_outputs(urls, output)
    for url in ignored:
        log.info("%s: an output of this job, not an input: ignored", safe_url(url))
    urls = [u for u in urls if u not in ignored]
    names = output_names(urls)
    mpps = pixel_size_overrides(urls, opts)
    slides = [(url, names[url], mpps[url]) for url in urls]
    run = ArchiveRun(slides, output, opts, hashes, wait_for_nodes=wait)
    try:
        report = run.run()
    except RuntimeError as err:  # the pool itself is lost: report every slide not ended
        report = run.report
        for url, name, _ in slides:
            if not any(name in report[k] for k in ("done", "skipped", "failed")):
                report["failed"][name] = str(err)
    report["inputs"] = {name: safe_url(url) for url, name, _ in slides}
    report["ignored"] = [safe_url(u) for u in ignored]
    report["output"] = safe_url(output)
    report["wall_s"] = round(time.perf_counter() - started, 3)
    _write_json(f"{output.rstrip('/')}/run_summary.json", report)
    try:
        log.info("run report: %s", safe_url(write_report(output)))
    except Exception as err:  # noqa: BLE001 - the report never costs the job its result
        log.warning("run report not written (%s: %s)", type(err).__name__, err)
    return report
