"""A GGUF file's tensors, memory-mapped and kept in the blocks they ship in.

`GGUFFile(path)` reads the tensor table and maps the data: no tensor is converted or copied, so the
runtime reads the model's own bytes (4-6x fewer than an fp32 copy) and loads in about a second.
Why not gguf-py's `GGUFReader`: it turns every metadata array element into a numpy view up front
(about 10 s for Gemma 3's 262k-token vocabulary), and the runtime needs only the tensor table; the
tokenizer and config come from transformers' GGUF support, once, and are cached (loading.py).
The block formats and their decoding are gguf-py's (`gguf.GGML_QUANT_SIZES`, `gguf.quants`); the
kernels decode the same bits (kernels/gguf_blocks.h).
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from casspec.runtime import lowbit

# ggml types the CPU kernels read in place (kernels/gguf_blocks.h); others are dequantized at load.
NATIVE_TYPES = frozenset({0, 1, 2, 3, 6, 8, 12, 14, 30})  # F32 F16 Q4_0 Q4_1 Q5_0 Q8_0 Q4_K Q6_K BF16
KERNEL_TYPES = NATIVE_TYPES | lowbit.BITS.keys()  # and casspec's own low-bit draft formats
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class NativeTensor:
    """One weight matrix [N, K] as rows of ggml blocks: `blocks` is uint8 [N, row bytes]."""

    blocks: torch.Tensor
    qtype: int
    shape: tuple[int, int]  # (N, K) logical

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    @property
    def type_name(self) -> str:
        return lowbit.name(self.qtype)

    def rows(self, index: torch.Tensor) -> NativeTensor:
        """A copy holding only rows `index` (a pruned head); same format."""
        return NativeTensor(self.blocks[index].contiguous(), self.qtype, (int(index.numel()), self.shape[1]))

    def dequantize(self, ids: torch.Tensor | None = None) -> torch.Tensor:  # [len(ids) or N, K] fp32
        """fp32 values, bit-identical to gguf-py's (and so HF transformers') dequantization: the kernels where
        they read this format, else gguf-py itself."""
        from casspec.runtime import kernels

        if self.qtype in KERNEL_TYPES and self.shape[1] % 32 == 0 and kernels.available():
            return kernels.module().dequantize_rows(self.blocks, self.qtype, self.shape[1], ids)
        rows = self.blocks if ids is None else self.blocks[ids]
        if self.qtype in lowbit.BITS:
            return lowbit.dequantize(rows, self.qtype, self.shape[1])
        flat = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32).reshape(-1, self.shape[1]))


class GGUFFile:
    """The tensor table of a GGUF file and its data, memory-mapped read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(1 << 20)
            reader = _Reader(head, f)
            infos, alignment = reader.tensor_table()
            data_start = -(-reader.pos // alignment) * alignment
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.arch: str = reader.meta.get("general.architecture", "")
        self.tensors: dict[str, NativeTensor | torch.Tensor] = {}
        for name, dims, qtype, offset in infos:
            self.tensors[name] = _tensor(raw, data_start + offset, dims, qtype)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> NativeTensor | torch.Tensor:
        return self.tensors[name]


def _tensor(raw: np.memmap, start: int, dims: list[int], qtype: int) -> NativeTensor | torch.Tensor:
    """A 2-D tensor as NativeTensor over the mapped bytes; 1-D (norms, biases) as fp32 torch tensors."""
    shape = tuple(reversed(dims))  # ggml lists the fastest dimension first
    k = shape[-1]
    n = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row = lowbit.row_bytes(qtype, k)
    with warnings.catch_warnings():  # the map is read-only and the runtime never writes to it
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(raw[start:start + n * row].reshape(n, row))
    t = NativeTensor(blocks, qtype, (n, k))
    if len(shape) == 1 or qtype not in NATIVE_TYPES:
        values = t.dequantize()
        return values.reshape(shape).clone() if len(shape) == 1 else NativeTensor(_f32_blocks(values), 0, (n, k))
    return t


def _f32_blocks(values: torch.Tensor) -> torch.Tensor:
    """fp32 rows [N, K] as the F32 "blocks" the kernels read (uint8 [N, 4 K])."""
    return values.contiguous().view(torch.uint8).reshape(values.shape[0], -1)


class _Reader:
    """Walks the GGUF header: metadata (strings and scalars kept, arrays skipped) and the tensor table."""

    def __init__(self, head: bytes, f: object) -> None:
        self.buf, self.f, self.pos = head, f, 0
        self.meta: dict[str, Any] = {}  # a key's value as the file types it: str, int, float, bool; None: an array

    def _need(self, n: int) -> None:
        while self.pos + n > len(self.buf):
            more = self.f.read(max(n, 1 << 20))  # type: ignore[attr-defined]
            if not more:
                raise ValueError("truncated GGUF header")
            self.buf += more

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        self._need(size)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        self._need(n)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("IQ")
            if etype in _SCALARS:  # skip fixed-size elements in one step
                size = struct.calcsize("<" + _SCALARS[etype]) * count
                self._need(size)
                self.pos += size
            elif etype == _STRING:
                for _ in range(count):  # lengths only: a vocabulary is 100k+ strings
                    self._need(8)
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            else:
                for _ in range(count):
                    self._value(etype)
            return None
        return self._unpack(_SCALARS[vtype])[0]

    def tensor_table(self) -> tuple[list[tuple[str, list[int], int, int]], int]:
        magic, version = self._unpack("4sI")
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"not a GGUF v2+ file (magic {magic!r}, version {version})")
        n_tensors, n_kv = self._unpack("QQ")
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("I")
            self.meta[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("I")
            dims = list(self._unpack("Q" * n_dims))
            qtype, offset = self._unpack("IQ")
            infos.append((name, dims, qtype, offset))
        return infos, int(self.meta.get("general.alignment", 32))
