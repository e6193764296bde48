"""Whole-slide segmentation of an archive on Ray: checks, then the archive engine.

Before any slide is touched, the options are validated, the output root is probed for
writing, the cluster is checked for the resources the model actors ask for, and the
weights are loaded once on the driver (strict key check) and hashed. Then one
:class:`~mediar_ray.pipeline.engine_core.ArchiveRun` (Ray Core; ``MEDIAR_ENGINE=data``:
the Ray Data pipeline of :mod:`~mediar_ray.pipeline.engine`) segments every slide: each
slide ``<name>`` becomes ``OUTPUT/<name>.zarr``, complete when ``.mediar_complete``
exists (written last). A rerun skips complete slides made with the same input, options
and weights, reuses matching unfinished state, and redoes the rest. A slide that fails
is logged and reported in ``OUTPUT/run_summary.json``; the others finish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mediar_ray.io import redact, safe_url, url_secrets
from mediar_ray.pipeline import engine, engine_core
from mediar_ray.pipeline.cluster import check_resources, ensure_ray
from mediar_ray.pipeline.layout import record_output_names, stable_output_names
from mediar_ray.pipeline.lease import Leases
from mediar_ray.pipeline.options import OptionError, SlideOptions
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


def check_weights(opts: SlideOptions) -> tuple[SlideOptions, list[str]]:
    """``opts`` with the weights resolved (none: the bundled model) and ``roi_size`` set
    (None: the weights' own window size), and the SHA-256 hashes of the checkpoints
    (part of every slide's fingerprint); raises a
    :class:`~mediar_ray.weights.CheckpointError` naming a file that cannot be read.

    Whether they fit the model (strict keys and shapes) is checked by the model actors
    as they load them, before any slide is planned (:class:`.engine.ArchiveRun`): the
    driver never imports the model code.
    """
    from mediar_ray.weights import checkpoint_sha256, resolve_weights, window_size

    weights = resolve_weights(opts.weights)
    opts = dataclasses.replace(
        opts, weights=weights, roi_size=opts.roi_size or window_size(weights)
    )
    return opts, [checkpoint_sha256(w) for w in weights]


def slide_fingerprint(
    url: str, opts: SlideOptions, weight_hashes: list[str], mpp: float | None = None
) -> dict:
    """The fingerprint a run with ``opts`` gives slide ``url`` (see :mod:`.provenance`);
    ``mpp`` is the slide's pixel-size override (--mpp or its --mpp-csv row)."""
    return fingerprint(input_identity(url), {**opts.result_options(), "mpp": mpp}, weight_hashes)


def pixel_size_overrides(urls: list[str], opts: SlideOptions) -> dict[str, float | None]:
    """Each slide's pixel-size override: ``--mpp`` for all, else its ``--mpp-csv`` row.

    Raises :class:`OptionError` when two rows of the table match one slide with
    different pixel sizes; rows that match no input are listed in a warning.
    """
    from mediar_ray.scale import load_mpp_table, match_mpp_rows

    if opts.mpp is not None or not opts.mpp_csv:
        return {url: opts.mpp for url in urls}
    table = load_mpp_table(opts.mpp_csv)
    try:
        found, unmatched = match_mpp_rows(table, urls)
    except ValueError as err:
        raise OptionError(f"--mpp-csv {safe_url(opts.mpp_csv)}: {err}") from None
    if unmatched:
        log.warning(
            "--mpp-csv %s: %d row(s) match no input and are not used: %s",
            safe_url(opts.mpp_csv),
            len(unmatched),
            ", ".join(unmatched),
        )
    return found


def check_tissue_masks(names: list[str], opts: SlideOptions) -> None:
    """``--tissue MASK_URL``: every slide's mask exists (``{name}``: each slide's own)."""
    if opts.tissue in ("auto", "off"):
        return
    urls = dict.fromkeys(opts.tissue.replace("{name}", n) for n in names)
    missing = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            missing.append(safe_url(url))
    if missing:
        raise OptionError(
            f"--tissue: {len(missing)} mask(s) not found: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; give an existing mask image "
            "({name} stands for each slide's output name), or --tissue auto"
        )


def find_inputs(inputs: list[str]) -> list[str]:
    """Slide URLs of files, folders and globs (:func:`mediar_ray.sources.discover.find_slides`)."""
    from mediar_ray.errors import UserError
    from mediar_ray.io import InputError, describe_error
    from mediar_ray.sources.discover import find_slides

    try:
        return find_slides(inputs)
    except (UserError, FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001 - an object store's own (bad bucket, no access)
        raise InputError(
            f"cannot list the inputs {', '.join(map(safe_url, inputs))} ({describe_error(err)})"
        ) from None


def own_outputs(urls: list[str], output: str) -> list[str]:
    """The inputs that are outputs of this job: ``<name>.zarr`` folders right under the
    output root holding a completion marker, scratch state or labels (an input folder
    that is also the output folder lists them beside the images)."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    own = []
    for url in urls:
        path = fsspec.core.url_to_fs(url)[1].rstrip("/")
        if (
            path.endswith(".zarr")
            and path.rsplit("/", 1)[0] == root
            and any(
                fs.exists(f"{path}/{p}") for p in (".mediar_complete", ".scratch", "labels/cells")
            )
        ):
            own.append(url)
    return own


def write_summary(output: str, report: dict[str, Any]) -> bool:
    """Write ``OUTPUT/run_summary.json`` (atomically); on failure log one line saying
    why and return False (the slides' own outputs are written already)."""
    from mediar_ray.io import atomic_open, describe_error

    url = f"{output.rstrip('/')}/run_summary.json"
    try:
        with atomic_open(url, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    except Exception as err:  # noqa: BLE001 - reported, the job's results stand
        log.error(
            "cannot write the run summary %s (%s); the slides' outputs are in place",
            safe_url(url),
            describe_error(err),
        )
        return False
    return True


class _Redact(logging.Filter):
    """Blank the job's URL credentials in every line its log shows."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), *self.secrets), None
        return True


def run_slides(inputs: list[str], output: str, opts: SlideOptions) -> dict[str, Any]:
    """Segment every slide of ``inputs`` into ``output``; returns the run summary, which
    is also written to ``OUTPUT/run_summary.json``.

    Raises
    ------
    OptionError, ResourceError, PermissionError, FileNotFoundError, CheckpointError
        Before any slide is touched: bad options, resources the cluster cannot provide,
        an unwritable output root, no inputs, unreadable weights. The checks that need
        no cluster run before Ray starts.
    """
    secrets = url_secrets([*inputs, output, opts.mpp_csv or "", opts.tissue, *opts.weights])
    redacting = _Redact(secrets)
    log.addFilter(redacting)
    try:
        return _run_slides(inputs, output, opts.validate(), secrets)
    finally:
        log.removeFilter(redacting)


def _run_slides(
    inputs: list[str], output: str, opts: SlideOptions, secrets: list[str]
) -> dict[str, Any]:
    started = time.perf_counter()
    check_output_root(output)
    urls = find_inputs(inputs)
    ignored = own_outputs(urls, output)
    for url in ignored:
        log.info("%s: an output of this job, not an input: ignored", safe_url(url))
    urls = [u for u in urls if u not in ignored]
    names = stable_output_names(urls, output)
    mpps = pixel_size_overrides(urls, opts)
    check_tissue_masks([names[u] for u in urls], opts)
    ensure_ray(dashboard=False)
    wait = check_resources(opts)
    opts, hashes = check_weights(opts)
    record_output_names(names, output)  # every check passed: the slides get these names
    slides = [(url, names[url], mpps[url]) for url in urls]
    # The Ray Data engine (engine.py) runs with MEDIAR_ENGINE=data. It becomes the only
    # engine once bench/archive_throughput.py has measured it against the Ray Core engine
    # (engine_core.py) on the idle machine and its elastic pool has been shown growing on
    # an autoscaling cluster (issue 40); until then the proven engine stays the default.
    chosen = engine if os.environ.get("MEDIAR_ENGINE") == "data" else engine_core
    run = chosen.ArchiveRun(slides, output, opts, hashes, wait_for_nodes=wait)
    run.leases = Leases(output)
    stop_leases = run.leases.keep_alive(run.in_flight)
    try:
        report = run.run()
    except RuntimeError as err:  # the pool itself is lost: report every slide not ended
        report = run.report
        for _, name, _ in slides:
            if not any(name in report[k] for k in ("done", "skipped", "failed", "elsewhere")):
                report["failed"][name] = str(err)
    finally:
        stop_leases()
    report["failed"] = {k: redact(v, *secrets) for k, v in report["failed"].items()}
    report["inputs"] = {name: safe_url(url) for url, name, _ in slides}
    report["ignored"] = [safe_url(u) for u in ignored]
    report["output"] = safe_url(output)
    report["wall_s"] = round(time.perf_counter() - started, 3)
    report["summary_written"] = write_summary(output, report)
    try:
        log.info("run report: %s", safe_url(write_report(output)))
    except Exception as err:  # noqa: BLE001 - the report never costs the job its result
        log.warning("run report not written (%s: %s)", type(err).__name__, err)
    return report
