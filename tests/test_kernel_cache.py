"""The compiled-kernel cache survives a build killed halfway and is shared by checkouts of the same sources."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from casspec.runtime import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")

LOAD = "from casspec.runtime import kernels; import sys; sys.exit(0 if kernels.available() else 3)"


def _load_in_subprocess(timeout: float) -> int:
    return subprocess.run([sys.executable, "-c", LOAD], timeout=timeout, env=os.environ.copy()).returncode


def test_a_lock_left_by_a_killed_build_does_not_make_later_loads_wait():
    """torch's build lock file, left by a process killed while compiling, used to make every later load hang."""
    (kernels.build_dir() / "lock").touch()
    assert _load_in_subprocess(timeout=120) == 0
    assert not (kernels.build_dir() / "lock").exists()


def test_the_build_reads_its_own_copy_of_the_sources():
    """Another checkout of the same sources (same folder key) builds from the same paths: no second compile."""
    staged = kernels.build_dir() / "src"
    assert {p.name for p in staged.iterdir()} >= {f.name for f in kernels.SOURCES + kernels.HEADERS}
    assert all((staged / f.name).read_bytes() == f.read_bytes() for f in kernels.SOURCES)
    ninja = (kernels.build_dir() / "build.ninja").read_text()
    assert str(staged) in ninja and str(kernels.HERE) not in ninja
