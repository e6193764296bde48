"""``mediar-ray segment``: segment image files on this machine.

Exit codes: 0 when every image was segmented; 1 when some inputs failed (missing, not an
image, unreadable, not writable: each is listed with its reason, and every other image is
still segmented); 2 for a usage error found before any image is touched (an option out of
range, a device this machine does not have, weights or model parameters that cannot be
loaded, an output that cannot be written, no input image at all).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import posixpath
import time

from mediar_ray.commands.options import add_precision_options, roi_size

log = logging.getLogger("mediar_ray.segment")

LABEL_SUFFIX = "_label.tiff"
RAW_SUFFIX = "_raw.npy"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``segment`` sub-command and its options; ``func`` is :func:`run`.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``mediar-ray`` sub-command registry (from ``add_subparsers``).
    """
    p = subparsers.add_parser(
        "segment",
        help="segment image files (tif, png, jpg, bmp; local or fsspec URLs)",
        description="Segment images with MEDIAR on this machine. Writes <name>_label.tiff "
        "(uint16 when every id fits, else uint32; zlib) per image into --output, where "
        "<name> is the file name less its extension, made unique when two inputs share "
        "it (see the README's 'What happens when...'). Files named like this command's outputs "
        "(*_label.tiff) inside --output are not taken as inputs. Exit code 0: all done; "
        "1: some inputs failed (listed, the rest done); 2: usage error.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    p.add_argument("--output", "-o", required=True, help="output folder or fsspec URL")
    p.add_argument(
        "--weights",
        action="append",
        metavar="CKPT",
        help="checkpoint (.pth or .safetensors, path or URL); repeat for an ensemble; "
        "default: the bundled small model",
    )
    p.add_argument(
        "--model-config",
        metavar="JSON",
        help="model parameters as a JSON file or inline JSON (encoder_name, "
        "decoder_channels, decoder_pab_channels, ...)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="test-time augmentation with flips (default: on)",
    )
    p.add_argument(
        "--save-raw",
        action="store_true",
        help="also write <name>_raw.npy: the (3, H, W) float32 dy, dx, logit",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    add_precision_options(p)
    p.add_argument(
        "--roi-size",
        type=roi_size,
        default=None,
        help="sliding-window size in pixels, a multiple of 32 from 32 to 4096 "
        "(default: the crop size the weights were trained on, as stored in "
        "mediar_ray checkpoints: 256 for the bundled model; else MEDIAR's 512)",
    )
    p.set_defaults(func=run)


def _save_npy(array, url: str) -> None:
    import fsspec
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def _folder_key(url: str) -> tuple[str, str]:
    """(protocol, absolute path) of a folder, comparable between inputs and output."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, path.rstrip("/")


def own_outputs(inputs: list[str], output: str) -> list[str]:
    """The inputs that are this command's outputs: ``*_label.tiff`` files directly in
    the output folder (``segment in/ --output in/`` run twice must not segment them)."""
    out_key = _folder_key(output)
    own = []
    for url in inputs:
        if not url.lower().endswith(LABEL_SUFFIX):
            continue
        protocol, path = _folder_key(url)
        if (
            protocol,
            posixpath.dirname(path) if protocol != "file" else os.path.dirname(path),
        ) == out_key:
            own.append(url)
    return own


def prepare_output(output: str) -> None:
    """Create the output folder and check it can be written (a probe file is written and
    removed), so an unwritable output stops the command before any image is segmented.

    Raises
    ------
    InputError
        One line naming the output and the fix.
    """
    import fsspec

    from mediar_ray.io import InputError, describe_error, safe_url

    probe = f"{output.rstrip('/')}/.mediar-ray-write-check-{os.getpid()}"
    try:
        fs, root = fsspec.core.url_to_fs(output)
        if fs.isfile(root):
            raise NotADirectoryError(f"{root} is a file")
        fs.makedirs(root, exist_ok=True)
        with fsspec.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(fsspec.core.url_to_fs(probe)[1])
    except Exception as err:  # any failure here means: cannot write there
        raise InputError(
            f"--output {safe_url(output)}: cannot write there "
            f"({describe_error(err)}); choose a writable folder"
        ) from None


def _report(
    done: dict[str, tuple[str, int]], failed: dict[str, str], skipped: list[str], output: str
) -> None:
    """Print what became of every input: input -> output, failed, or skipped."""
    total = len(done) + len(failed)
    print(f"segmented {len(done)} of {total} image(s) into {output}")
    for url, (name, cells) in done.items():
        print(f"  {url} -> {name}{LABEL_SUFFIX} ({cells} cells)")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are outputs of this command:")
        for url in skipped:
            print(f"  {url}")
    if failed:
        print(f"failed {len(failed)} input(s):")
        for url, why in failed.items():
            print(f"  {url}: {why}")


def _segment_one(url: str, name: str, out: str, models, args: argparse.Namespace, device) -> int:
    """Segment ``url`` into ``out/<name>_label.tiff`` (and ``_raw.npy``); returns the
    number of cells."""
    import numpy as np

    from mediar_ray.io import read_image, safe_url, write_labels_tiff
    from mediar_ray.segment import segment_image

    image = read_image(url)
    if np.issubdtype(image.dtype, np.floating):
        missing = int(image.size - np.count_nonzero(np.isfinite(image)))
        if missing:
            log.warning(
                "%s: %d NaN/infinite value(s) treated as background", safe_url(url), missing
            )
    result = segment_image(
        image,
        models,
        tta=args.tta,
        device=device,
        sw_batch_size=args.batch_size,
        roi_size=args.roi_size,
        precision=args.precision,
    )
    write_labels_tiff(result.labels, f"{out}/{name}{LABEL_SUFFIX}")
    if args.save_raw:
        _save_npy(result.raw, f"{out}/{name}{RAW_SUFFIX}")
    return int(result.labels.max())


def run(args: argparse.Namespace) -> int:
    """Segment every input image into ``--output`` and print what became of each.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``mediar-ray segment``.

    Returns
    -------
    int
        Exit code: 0 all done; 1 some inputs failed (listed, the rest done); 2 usage
        error (bad device, weights or output, no input found).
    """
    from tqdm import tqdm

    from mediar_ray.io import find_inputs, image_name, output_names, safe_name, safe_url
    from mediar_ray.precision import resolve_precision
    from mediar_ray.segment import check_device, load_models, models_window, parse_model_config

    out = args.output.rstrip("/") or args.output
    try:
        device = check_device(args.device)
        log.info("network forward in %s on %s", resolve_precision(args.precision, device), device)
        prepare_output(out)
        models = load_models(args.weights, parse_model_config(args.model_config), device)
        args.roi_size = args.roi_size or models_window(models)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        log.error("%s", err)
        return 2
    inputs, problems = find_inputs(args.inputs)
    skipped = own_outputs(inputs, out)
    for url in skipped:
        log.info(
            "%s: skipped: a *%s file in the output folder is an output of this "
            "command, not an input",
            safe_url(url),
            LABEL_SUFFIX,
        )
    inputs = [u for u in inputs if u not in skipped]
    failed = {item: why for item, why in problems}
    for item, why in problems:
        log.error("%s: %s", item, why)
    if not inputs:
        log.error(
            "nothing to segment: no input image found in %s",
            " ".join(safe_url(i) for i in args.inputs),
        )
        return 2
    names = output_names(inputs)
    for url, name in names.items():
        if name != safe_name(image_name(url)):
            log.info(
                "%s: named %s, as another input has the name %s",
                safe_url(url),
                name,
                safe_name(image_name(url)),
            )
    done: dict[str, tuple[str, int]] = {}
    for url in tqdm(inputs, desc="images", unit="img", disable=len(inputs) < 2):
        start = time.perf_counter()
        try:
            cells = _segment_one(url, names[url], out, models, args, device)
        except Exception as err:  # one bad file must not stop the batch
            failed[safe_url(url)] = f"{type(err).__name__}: {err}"
            log.error("failed: %s: %s", safe_url(url), err)
            continue
        done[safe_url(url)] = (names[url], cells)
        log.info(
            "%s -> %s%s: %d cells in %.1f s",
            safe_url(url),
            names[url],
            LABEL_SUFFIX,
            cells,
            time.perf_counter() - start,
        )
    _report(done, failed, [safe_url(u) for u in skipped], safe_url(out))
    if failed:
        log.error("%d input(s) failed:", len(failed))
        for url, why in failed.items():
            log.error("  %s: %s", url, why)
        return 1
    return 0
