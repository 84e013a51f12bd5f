"""What one forward runs: rows of one or several sequences, each with the keys it may see.

A `Segment` is the part of a forward that belongs to one sequence: its query tokens, their positions,
the (region-relative) cache slots they write, and which of the sequence's keys each may attend to.
`Rows.build` lays several segments out as one forward: absolute slots, and per row the key range
[lo, lo + len) of its sequence's region plus a boolean mask over that range per layer type (sliding
windows included). A sequence's tokens see only its own region, so a batched forward computes for each
row exactly what that sequence's forward alone computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casspec.runtime.kv_cache import SeqCache


@dataclass
class Segment:
    """One sequence's rows in a forward."""

    cache: SeqCache
    input_ids: torch.Tensor  # [q]
    positions: torch.Tensor  # [q] absolute token positions
    slots: torch.Tensor  # [q] region-relative cache slots written
    allowed: torch.Tensor | None = None  # [q, kv_len] bool; None = causal by slot
    key_positions: torch.Tensor | None = None  # [kv_len] token position of each key; None = slot index

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class Rows:
    """A forward's rows, ready for the backend ops."""

    input_ids: torch.Tensor  # [M]
    positions: torch.Tensor  # [M]
    slots: torch.Tensor  # [M] absolute pool slots
    key_lo: torch.Tensor  # [M] first key slot of the row's region
    key_len: torch.Tensor  # [M] keys visible from key_lo on
    masks: dict[str, torch.Tensor | None]  # layer type -> [M, W] bool (None: every key in range is visible)

    @staticmethod
    def build(segments: list[Segment], windows: dict[str, int | None], device: torch.device) -> Rows:
        """Lay `segments` out as one forward; `windows` maps each layer type to its sliding window."""
        pool = segments[0].cache.pool
        if any(s.cache.pool is not pool for s in segments):
            raise ValueError("a batched forward needs every sequence in the same KV pool")
        parts = [_segment_rows(s, windows, device) for s in segments]
        width = max(int(p["kv_len"]) for p in parts)
        masks = {kind: _stack([p["masks"][kind] for p in parts], [len(s) for s in segments], width, device)
                 for kind in windows}
        cat = lambda key: torch.cat([p[key] for p in parts]) if len(parts) > 1 else parts[0][key]  # noqa: E731
        return Rows(cat("input_ids"), cat("positions"), cat("slots"), cat("key_lo"), cat("key_len"), masks)


def _segment_rows(seg: Segment, windows: dict[str, int | None], device: torch.device) -> dict:
    ids, pos, slots = (t.to(device, non_blocking=True) for t in (seg.input_ids, seg.positions, seg.slots))
    kv_len = seg.cache.check_slots(slots)
    q = slots.numel()
    allowed = None if seg.allowed is None else seg.allowed.to(device, non_blocking=True)
    if allowed is None and q > 1:
        allowed = torch.arange(kv_len, device=device)[None, :] <= slots[:, None]  # causal by slot
    k_pos = None if seg.key_positions is None else seg.key_positions.to(device, non_blocking=True)
    masks = {}
    for kind, window in windows.items():
        ok = allowed
        if window is not None and kv_len > window:
            k = k_pos if k_pos is not None else torch.arange(kv_len, device=device)
            near = k[None, :] > pos[:, None] - window
            ok = near if ok is None else ok & near
        masks[kind] = None if ok is None or bool(ok.all()) else ok
    base = seg.cache.base
    return {"input_ids": ids, "positions": pos, "slots": slots + base, "masks": masks, "kv_len": kv_len,
            "key_lo": torch.full((q,), base, dtype=torch.long, device=device),
            "key_len": torch.full((q,), kv_len, dtype=torch.long, device=device)}


def _stack(masks: list[torch.Tensor | None], rows: list[int], width: int, device: torch.device) -> torch.Tensor | None:
    """One [M, width] mask from per-segment masks (None = all visible), or None if all are None."""
    if all(m is None for m in masks):
        return None
    if len(masks) == 1:
        only = masks[0]
        assert only is not None  # not all None, and there is one
        return only.contiguous()
    out = torch.ones(sum(rows), width, dtype=torch.bool, device=device)
    r = 0
    for m, n in zip(masks, rows):
        if m is not None:
            out[r:r + n, :m.shape[1]] = m
        r += n
    return out
