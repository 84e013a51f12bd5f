"""What this CPU is and which vector instructions it has: for reports and for the keys of what is measured.

Two x86-64 CPUs that both say "x86_64" (Python's `platform.processor()` is empty on Linux) can differ twice
over in what casspec's kernels do: a forward of SmolLM2's native target took 5.1 ms on one 2-core machine
with AVX-VNNI and 10.3 ms on a 2-core Zen 3 with AVX2 only, and the int8 draft cost 0.6 and 0.73 of it. So
a benchmark names the CPU's model and features, and a cached calibration (latency model, low-bit choice) is
keyed by them: one measured on another CPU is measured again, not reused.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The features that change which kernel runs or how fast (/proc/cpuinfo names), in the order reported.
FEATURES = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's model name and which of FEATURES it has, from /proc/cpuinfo's text."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return {"model": model, "features": " ".join(f for f in FEATURES if f in flags)}


@functools.cache
def cpu_info() -> dict[str, str]:
    """This CPU: {"model", "features"} (which int8 dot product the kernels use, they decide themselves at run
    time: avx_vnni among the features means `vpdpbusd`). Where /proc/cpuinfo cannot be read, the model is what
    `platform` says and the features are empty."""
    try:
        info = parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        info = {"model": "", "features": ""}
    info["model"] = info["model"] or platform.processor() or platform.machine()
    return info


def cpu_summary() -> str:
    """One line for reports: "AMD EPYC, 2 cores (avx2 fma f16c)"."""
    info = cpu_info()
    return f"{info['model']}, {os.cpu_count()} cores ({info['features'] or 'no AVX2'})"
