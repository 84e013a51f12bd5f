"""Quantized draft weights on disk: built once per model, then read back in a fraction of the time.

Reading the int8 copy of SmolLM2 (134 MB) from the cache takes about 0.1 s where quantizing it takes
1.6 s (Gemma-3-270M: 3.8 s), so `load()` reads it when it can. Files are safetensors under
<cache>/quantized/<model fingerprint>-<kind>-<format>.safetensors; the fingerprint covers the config
and a sample of every parameter, so a changed checkpoint never reads stale weights.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from casspec.runtime.sources import GGUFSource
from casspec.runtime.weights import ModelWeights, Proj

FORMAT = "1"  # bump when the tiled layouts change
_SAMPLES = 64  # values hashed per parameter


def fingerprint(model: nn.Module, source: GGUFSource | None = None) -> str:
    """A short id of the weights: the config plus shape and strided samples of every parameter (a GGUF
    file: its path, size and modification time)."""
    h = hashlib.sha1(model.config.to_json_string().encode())
    if source is not None:
        stat = source.file.path.stat()
        h.update(f"{source.file.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[::step][:_SAMPLES].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(folder: Path, model_key: str, kind: str) -> Path:
    return folder / "quantized" / f"{model_key}-{kind}-{FORMAT}.safetensors"


def save(weights: ModelWeights, path: Path) -> bool:
    """Write the tiled tensors of a quantized copy (atomically); False if some projection is not tiled."""
    projs = weights.named_projections()
    if any(p.tiled is None for p in projs.values()):
        return False
    tensors = {}
    for key, p in projs.items():
        for field in ("tiled", "scale", "mins"):
            t = getattr(p, field)
            if t is not None:
                tensors[f"{key}.{field}"] = t.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(path)
    return True


def load(fp32: ModelWeights, kind: str, path: Path) -> ModelWeights | None:
    """The quantized copy stored at `path`, shaped after `fp32`, or None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        out = fp32.map_projections(lambda key, p: _restore(key, p, kind, tensors))
    except (OSError, KeyError, ValueError, RuntimeError):
        return None
    return out


def _restore(key: str, p: Proj, kind: str, tensors: dict[str, torch.Tensor]) -> Proj:
    tiled = tensors[f"{key}.tiled"]
    group = 0
    if kind == "int4":
        group = 2 * tiled.shape[-1]
    return replace(p, parts=None, kind=kind, tiled=tiled, scale=tensors[f"{key}.scale"],
                   mins=tensors.get(f"{key}.mins"), group=group, _dense=None)
