"""Cache files that survive crashes, races, full disks and read-only folders.

Every file casspec keeps under its cache folder (quantized weights, the draft vocabulary's ranking, the
latency calibration, layer sets, a GGUF file's tokenizer and config) is written and read here:
  * a write goes to a temporary name of this process in the same folder, then `os.replace`s the final
    name, so a reader sees the old file or the new one, never half of one, and two processes filling the
    same empty cache both succeed (the last rename wins; both wrote the same thing);
  * a write is best effort: a folder that cannot be written (read-only, full disk) means "no caching",
    with one warning per folder, never a failed load or request, and no temporary file left behind;
  * a read that fails (truncated, corrupt, the wrong shape or version) returns None with one warning per
    file, and the caller rebuilds what the file held (and writes it again);
  * temporary files a killed process left behind are deleted by the next write of the same file.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from casspec.errors import first_line

log = logging.getLogger("casspec.cache")
T = TypeVar("T")
_warned: set[tuple[str, str]] = set()  # (kind, folder or file) already warned about in this process
_unwritable: set[Path] = set()  # folders a write failed in: not tried again in this process
_lock = threading.Lock()
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a killed process (a write takes seconds)


def warn_once(kind: str, where: Path | str, message: str) -> None:
    """Log `message` as a warning the first time (kind, where) comes up in this process."""
    key = (kind, str(where))
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("casspec: %s", message)


def temp_name(path: Path) -> Path:
    """A name next to `path` that no other process or thread uses: .<name>.<pid>.<random>.tmp"""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def write_atomic(path: Path, write: Callable[[Path], object],
                 errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Run `write(tmp)` on a temporary path, then rename it to `path`. False (and one warning per folder)
    where the folder cannot be written: an OSError, or one of `errors` (what the writer raises for one,
    e.g. torch.save's RuntimeError on a full disk); other errors propagate. The temporary file never
    outlives the call."""
    folder = path.parent
    if folder in _unwritable:
        return False
    tmp = temp_name(path)
    caught: tuple[type[BaseException], ...] = (OSError, *errors)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
        _remove_stale(path)
        return True
    except caught as exc:
        with _lock:
            _unwritable.add(folder)
        warn_once("write", folder, f"cannot write the cache folder {folder} ({_reason(exc)}); "
                                   "running without caching there")
        return False
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _remove_stale(path: Path) -> None:
    """Delete temporary files of `path` left by killed processes (older than STALE_TMP_S)."""
    cutoff = time.time() - STALE_TMP_S
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass


def write_text(path: Path, text: str) -> bool:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: object) -> bool:
    return write_text(path, json.dumps(data))


def save_tensor(path: Path, tensor: torch.Tensor) -> bool:
    return write_atomic(path, lambda tmp: torch.save(tensor, tmp), (RuntimeError,))


def read(path: Path | None, parse: Callable[[Path], T], what: str) -> T | None:
    """`parse(path)`, or None where the file is absent or `parse` fails on it (one warning: `what` is
    rebuilt). `parse` raises on anything unexpected: a wrong shape or version counts as a failure."""
    if path is None or not path.exists():
        return None
    try:
        return parse(path)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, wrong shape or version: rebuild
        warn_once("read", path, f"ignoring the unreadable cache file {path} ({_reason(exc)}); rebuilding {what}")
        return None


def read_json(path: Path | None, check: Callable[[object], T], what: str) -> T | None:
    """The JSON document at `path` passed through `check` (which raises on a wrong shape), or None."""
    return read(path, lambda p: check(json.loads(p.read_text(encoding="utf-8"))), what)


def load_tensor(path: Path | None, check: Callable[[torch.Tensor], bool], what: str) -> torch.Tensor | None:
    """A tensor saved by `save_tensor` (read with weights_only=True) that passes `check`, or None."""
    def parse(p: Path) -> torch.Tensor:
        t = torch.load(p, weights_only=True)
        if not isinstance(t, torch.Tensor) or not check(t):
            raise ValueError("unexpected contents")
        return t
    return read(path, parse, what)


def _reason(exc: BaseException) -> str:
    """`Type: first line` (at most 200 characters of it), or the type alone for an exception without a message."""
    return f"{type(exc).__name__}: {first_line(exc)[:200]}" if str(exc).strip() else type(exc).__name__
