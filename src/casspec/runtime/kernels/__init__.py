"""casspec's CPU kernels (cpu_kernels.cpp), compiled once per machine and torch version, and cached.

`available()` compiles on first use (well under a minute, one progress line) and says whether the
ops `module().{linear, rope_kv, attention, add_rms_norm}` can be used. They need an x86 CPU with
AVX2, FMA and F16C and a C++ compiler; anywhere else the runtime uses its torch backend, which
computes the same functions with stock torch ops. `CASSPEC_KERNELS=0` turns the kernels off.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_kernels.cpp", HERE / "native_linear.cpp", HERE / "native_a8_vnni.cpp", HERE / "sampling.cpp",
           HERE / "layer.cpp", HERE / "argmax_bound.cpp", HERE / "native_wide.cpp"]
HEADERS = [HERE / "argmax_bound.h", HERE / "block_part.h", HERE / "common.h", HERE / "gguf_blocks.h", HERE / "layer.h",
           HERE / "native_a8.h", HERE / "native_a8_vnni.h", HERE / "native_linear.h", HERE / "native_wide.h", HERE / "ops.h",
           HERE / "sampling.h", HERE / "wide_blocks.h"]
# no fused multiply-adds but the explicit ones: block decoding must round as gguf-py does
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def supported_cpu() -> bool:
    """x86-64 with AVX2 (torch's own dispatch level says so; AVX-512 CPUs have AVX2 too)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512")


def build_dir() -> Path:
    """Where the compiled library lives: one folder per source, flags and torch version."""
    from casspec.runtime.loading import model_cache_dir

    code = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    key = hashlib.sha1(code + " ".join(FLAGS).encode() + torch.__version__.encode()).hexdigest()[:12]
    return model_cache_dir() / "kernels" / key


def available() -> bool:
    """Whether the kernels are loaded (compiling them now if needed). Never raises."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _load()
        return _state["module"] is not None


def module() -> ModuleType:
    """The compiled kernels (call `available()` first)."""
    if not available():
        raise RuntimeError("casspec CPU kernels are not available on this machine")
    return _state["module"]  # type: ignore[return-value]


def _load() -> ModuleType | None:
    if os.environ.get("CASSPEC_KERNELS", "1") == "0" or not supported_cpu():
        return None
    damaged = False
    while True:
        try:
            return _build(build_dir())
        except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the torch backend
            folder = _folder_or_none()
            if not damaged and folder is not None and any(folder.glob("*.so")):
                damaged = True  # a build that no longer loads (a truncated .so): remove it and build once more
                shutil.rmtree(folder, ignore_errors=True)
                continue
            warnings.warn(f"casspec CPU kernels unavailable, using stock torch ops ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})", RuntimeWarning, stacklevel=2)
            return None


def _build(folder: Path) -> ModuleType:
    """Compile (first use) or load the kernels kept in `folder`. The sources are built from a copy inside the
    folder, so another checkout of the same sources (a clean clone beside a working tree) finds the build
    torch made and does not compile again; one process builds at a time, under a lock the OS drops with it."""
    from torch.utils.cpp_extension import load

    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / "build.flock"):
        # torch's own lock file: left by a process killed while building, it would make every later load wait
        # for it forever; holding our lock, nobody else is building here
        (folder / "lock").unlink(missing_ok=True)
        sources = _staged(folder / "src")
        if not any(folder.glob("*.so")):
            print("casspec: compiling CPU kernels for this machine (once, about a minute)...", file=sys.stderr,
                  flush=True)
        return load(name="casspec_kernels", sources=[str(f) for f in sources], extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An advisory lock on `path` for the duration (released by the OS if the process dies); none where the
    platform has no flock (the kernels need x86 Linux-style toolchains anyway, but importing must not fail)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _staged(into: Path) -> list[Path]:
    """The sources and headers copied into `into` (kept where identical); returns the copied SOURCES."""
    into.mkdir(exist_ok=True)
    for f in SOURCES + HEADERS:
        target = into / f.name
        if not target.exists() or target.read_bytes() != f.read_bytes():
            shutil.copyfile(f, target)
    return [into / f.name for f in SOURCES]


def _folder_or_none() -> Path | None:
    try:
        return build_dir()
    except Exception:  # noqa: BLE001 - no cache folder at all
        return None
