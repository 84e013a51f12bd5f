"""Cache folders of a model file: the tokenizer and config of a GGUF file, or its converted safetensors.

A folder is named by a hash of the file (path, size, mtime), casspec's CACHE_FORMAT and the transformers
version, so a changed file or library is built again rather than misread. It is built in a temporary
folder and renamed into place (readers never see a half-written one, and two processes building at once
both end with a complete folder); a folder its reader fails on is moved aside and built again, with one
warning; where the cache cannot be written, the folder is built in a temporary directory for this load.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import transformers

from casspec.errors import first_line
from casspec.runtime import cache_files

CACHE_FORMAT = "1"  # bump to invalidate converted models after a change to the conversion
STALE_TMP_S = 6 * 3600
T = TypeVar("T")


def from_cache(gguf: Path, name: str, cache: Path, suffix: str, build: Callable[[Path, Path], None],
                complete: Callable[[Path], bool], read: Callable[[Path], T]) -> T:
    """`read(folder)` of the cache folder `build(gguf, folder)` fills for this file, built atomically if
    missing. A folder `read` fails on (a truncated or corrupt file) is built again, with one warning; where
    the cache cannot be written, the folder is built in a temporary directory removed after reading."""
    final = cache_folder(gguf, name, cache, suffix)
    if complete(final):
        try:
            return read(final)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes the reader raise: rebuild
            cache_files.warn_once("read", final, f"ignoring the unreadable cache folder {final} "
                                                 f"({type(exc).__name__}: {first_line(exc)}); building it again")
            discard(final)
    folder = build_in_cache(gguf, final, build, complete)
    if folder is not None:
        return read(folder)
    with tempfile.TemporaryDirectory(prefix="casspec-") as tmp:
        build(gguf, Path(tmp))
        return read(Path(tmp))


def cache_folder(gguf: Path, name: str, cache: Path, suffix: str) -> Path:
    stat = gguf.stat()
    ident = f"{CACHE_FORMAT}|{transformers.__version__}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    safe_name = re.sub(r"[^\w.-]", "_", name)
    return cache / "models" / f"{safe_name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}{suffix}"


def build_in_cache(gguf: Path, final: Path, build: Callable[[Path, Path], None],
                    complete: Callable[[Path], bool]) -> Path | None:
    """Fill `final` through a temporary folder and a rename; None (one warning) where the cache folder
    cannot be written (read-only, full disk)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as exc:
        cache_files.warn_once("write", final.parent, f"cannot write the cache folder {final.parent} ({exc}); "
                                                     "running without caching there")
        return None
    try:
        build(gguf, tmp)
        if final.exists() and not complete(final):
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):  # a concurrent conversion finished first: use that one
                raise
    except OSError as exc:
        cache_files.warn_once("write", final.parent, f"cannot write the cache folder {final.parent} ({exc}); "
                                                     "running without caching there")
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def discard(folder: Path) -> None:
    """Move a damaged cache folder out of the way (a rename, so no reader sees it half-deleted), then delete it."""
    trash = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(folder, trash)
    except OSError:
        return  # gone already (another process), or the cache is read-only: the rebuild goes elsewhere
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_tmp(parent: Path) -> None:
    """Delete temporary conversion directories left by killed processes."""
    cutoff = time.time() - STALE_TMP_S
    for entry in parent.glob(".tmp-*"):
        try:
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
