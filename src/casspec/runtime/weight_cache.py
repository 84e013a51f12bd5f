"""Quantized draft weights on disk: built once per model, then read back in a fraction of the time.

Reading the int8 copy of SmolLM2 (134 MB) from the cache takes about 0.1 s where quantizing it takes
1.6 s (Gemma-3-270M: 3.8 s), so `load()` reads it when it can. Files are safetensors under
<cache>/quantized/<model fingerprint>-<kind>-<format>.safetensors; the fingerprint covers the config
and a sample of every parameter, so a changed checkpoint never reads stale weights.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from casspec.runtime import cache_files
from casspec.runtime.sources import GGUFSource
from casspec.runtime.weights import TILE_K, TILE_ROWS, ModelWeights, Proj

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FORMAT = "1"  # bump when the tiled layouts change
_SAMPLES = 64  # values hashed per parameter


def fingerprint(model: nn.Module, source: GGUFSource | None = None) -> str:
    """A short id of the weights: the config plus shape and strided samples of every parameter (a GGUF
    file: its path, size and modification time)."""
    config = cast("PretrainedConfig", model.config)  # (nn.Module types its attributes as Tensor | Module)
    h = hashlib.sha1(config.to_json_string().encode())
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
    """Write the tiled tensors of a quantized copy (atomically, best effort: cache_files.py); False if some
    projection is not tiled or the cache folder cannot be written."""
    projs = weights.named_projections()
    if any(p.tiled is None for p in projs.values()):
        return False
    tensors = {}
    for key, p in projs.items():
        for field in ("tiled", "scale", "mins"):
            t = getattr(p, field)
            if t is not None:
                tensors[f"{key}.{field}"] = t.contiguous()
    return cache_files.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}),
                                    (SafetensorError,))


def load(fp32: ModelWeights, kind: str, path: Path) -> ModelWeights | None:
    """The quantized copy stored at `path`, shaped after `fp32`, or None if absent or unusable (a truncated
    or corrupt file, another format, a tensor of the wrong shape or dtype: one warning, then rebuilt)."""
    def parse(file: Path) -> ModelWeights:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"format {(f.metadata() or {}).get('format')!r}, expected {FORMAT!r}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return fp32.map_projections(lambda key, p: _restore(key, p, kind, tensors))
    return cache_files.read(path, parse, f"the {kind} weights")


def _restore(key: str, p: Proj, kind: str, tensors: dict[str, torch.Tensor]) -> Proj:
    tiled, scale, mins = tensors[f"{key}.tiled"], tensors[f"{key}.scale"], tensors.get(f"{key}.mins")
    tiles, group = (p.n + TILE_ROWS - 1) // TILE_ROWS, 0
    if kind == "int4":
        group = 2 * int(tiled.shape[-1]) if tiled.dim() == 4 else 0
        groups = p.k // group if group and group % 32 == 0 and p.k % group == 0 else -1
        ok = (tiled.dtype == torch.uint8 and tuple(tiled.shape) == (tiles, groups, TILE_ROWS, group // 2)
              and all(t is not None and t.dtype == torch.float16 and tuple(t.shape) == (tiles, groups, TILE_ROWS)
                      for t in (scale, mins)))
    else:
        ok = (tiled.dtype == torch.int8 and tuple(tiled.shape) == (tiles, p.k // TILE_K, TILE_ROWS, TILE_K)
              and scale.dtype == torch.float32 and tuple(scale.shape) == (p.n,) and mins is None)
    if not ok:
        raise ValueError(f"{key}: tensors do not fit a {kind} copy of [{p.n}, {p.k}]")
    return replace(p, parts=None, kind=kind, tiled=tiled, scale=scale, mins=mins, group=group, _dense=None)
