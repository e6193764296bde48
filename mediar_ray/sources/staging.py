"""Local copies of remote slides, for readers that need a local path (OpenSlide).

A remote slide (``s3://...`` or any non-local fsspec URL) is copied once per worker
process into a private scratch folder (``$MEDIAR_RAY_SCRATCH`` or the system temporary
folder, never the output root), together with the files it needs beside it: the data
folder of a 3DHISTECH ``.mrxs`` and the image files a Hamamatsu ``.vms``/``.vmu`` names.
Every task of the same slide in that process reuses the copy. A copy no reader holds is
kept while it is one of the :attr:`StagedSlides.keep` most recently used, removed after
that, and everything is removed at process exit; folders left by processes that were
killed are removed by the next process that stages.
"""

from __future__ import annotations

import atexit
import configparser
import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["StagedSlides", "companion_paths", "is_local", "staged"]

_PREFIX = "mediar_ray-staged-"


def is_local(url: str) -> bool:
    """True when ``url`` is a path on this machine (no copy needed)."""
    fs, _ = fsspec.core.url_to_fs(url)
    return isinstance(fs, LocalFileSystem)


def companion_paths(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Files and folders a slide file needs beside it (remote paths), for multi-file
    formats: ``name.mrxs`` -> its folder ``name/``; ``name.vms``/``.vmu`` -> the files
    its key file names (ImageFile*, MapFile, OptimisationFile, MacroImage)."""
    p = PurePosixPath(path)
    suffix = p.suffix.lower()
    if suffix == ".mrxs":
        folder = str(p.with_suffix(""))
        return [folder] if fs.isdir(folder) else []
    if suffix in (".vms", ".vmu"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # keep key case
        with fs.open(path, "r", encoding="utf-8", errors="replace") as f:
            parser.read_string(f.read())
        names = {
            v.strip()
            for section in parser.sections()
            for k, v in parser.items(section)
            if k.startswith(("ImageFile", "MapFile", "OptimisationFile", "MacroImage"))
            and v.strip()
        }
        return sorted(str(p.parent / n) for n in names)
    return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedSlides:
    """Per-process cache of local copies of remote slides, keyed by URL.

    Use :meth:`acquire` to get a local path (copying on first use) and :meth:`release`
    when the reader is closed."""

    def __init__(self, root: str | None = None, keep: int = 2) -> None:
        self._parent = Path(root or os.environ.get("MEDIAR_RAY_SCRATCH") or tempfile.gettempdir())
        self.keep = keep
        self._dir: Path | None = None
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, dict] = OrderedDict()  # url -> {path, users}

    def _folder(self) -> Path:
        if self._dir is None:
            self._parent.mkdir(parents=True, exist_ok=True)
            self._remove_orphans()
            self._dir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=self._parent))
            atexit.register(self.clear)
        return self._dir

    def _remove_orphans(self) -> None:
        """Folders of processes that died without their exit handler (killed workers)."""
        for old in self._parent.glob(f"{_PREFIX}*"):
            try:
                pid = int(old.name[len(_PREFIX) :].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(old, ignore_errors=True)

    def acquire(self, url: str) -> str:
        """Local path of ``url``'s copy (made now if this process has none)."""
        with self._lock:
            entry = self._entries.get(url)
            if entry is None:
                entry = {"path": self._copy(url), "users": 0}
                self._entries[url] = entry
            entry["users"] += 1
            self._entries.move_to_end(url)
            return entry["path"]

    def release(self, url: str) -> None:
        """One reader of ``url`` is done; remove copies beyond the ``keep`` idle ones."""
        with self._lock:
            if url in self._entries:
                self._entries[url]["users"] -= 1
            idle = [u for u, e in self._entries.items() if e["users"] <= 0]
            for old in idle[: max(0, len(idle) - self.keep)]:
                self._remove(old)

    def _remove(self, url: str) -> None:
        entry = self._entries.pop(url)
        shutil.rmtree(Path(entry["path"]).parent, ignore_errors=True)

    def clear(self) -> None:
        """Remove every copy and the scratch folder of this process."""
        with self._lock:
            self._entries.clear()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def _copy(self, url: str) -> str:
        fs, path = fsspec.core.url_to_fs(url)
        key = hashlib.sha1(url.encode()).hexdigest()[:16]
        partial = self._folder() / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        name = PurePosixPath(path).name
        try:
            fs.get(path, str(partial / name))
            for extra in companion_paths(fs, path):
                target = partial / PurePosixPath(extra).name
                if fs.isdir(extra):
                    fs.get(extra.rstrip("/") + "/", str(target), recursive=True)
                else:
                    fs.get(extra, str(target))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        final = self._folder() / key
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)  # complete copies only: a failed copy leaves no usable path
        return str(final / name)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def folder(self) -> Path | None:
        """The scratch folder of this process (None before the first copy)."""
        return self._dir


#: The cache of this process.
staged = StagedSlides()
