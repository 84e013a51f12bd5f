"""Execution plans: how one forward of the target runs (the paper's DSIA "virtual" draft models).

A plan is data, never a global mode flag. `Full()` is the target itself; the others are switchable
inference accelerations of the same weights and the same KV cache:

    LayerSkip(attn={3, 4}, mlp={4})   skip attention / MLP sub-layers (layer sparsity)
    Int8(), Int4()                    weight-only int8 / group-wise int4 copies of every projection
    Act8()                            the target's own blocks with int8 activations (activation quantization)
    LowBit()                          per-projection 2-8 bit copies chosen by sensitivity, int8 activations
    EarlyExit(12)                     run layers [0, 12) then the final norm and head
    PrunedVocab()                     score only the draft vocabulary's rows of the head (vocabulary sparsity)
    Int8() | LayerSkip(mlp={5})       mixing: compose orthogonal accelerations
"""
from __future__ import annotations

from dataclasses import dataclass, field

PRECISION = ("fp32", "a8", "lowbit", "int8", "int4")  # mixing two plans keeps the lower precision


@dataclass(frozen=True)
class ExecutionPlan:
    """One way to run the target's layer loop."""

    weights: str = "fp32"  # the target's ("fp32"), "a8" (its blocks, int8 activations), "lowbit", "int8", "int4"
    skip_attn: frozenset[int] = field(default_factory=frozenset)  # layers whose attention sub-layer is skipped
    skip_mlp: frozenset[int] = field(default_factory=frozenset)  # layers whose MLP sub-layer is skipped
    exit_layer: int | None = None  # run layers [0, exit_layer) only
    vocab: bool = False  # score only the runner's DraftVocab (a pruned draft head); logits follow its ids

    def __or__(self, other: ExecutionPlan) -> ExecutionPlan:
        """Mix two plans: union of accelerations."""
        exits = [e for e in (self.exit_layer, other.exit_layer) if e is not None]
        return ExecutionPlan(
            weights=max(self.weights, other.weights, key=PRECISION.index),
            skip_attn=self.skip_attn | other.skip_attn,
            skip_mlp=self.skip_mlp | other.skip_mlp,
            exit_layer=min(exits) if exits else None,
            vocab=self.vocab or other.vocab,
        )

    @property
    def quantized(self) -> bool:
        return self.weights != "fp32"

    @property
    def is_full(self) -> bool:
        return self == FULL

    def runs_attn(self, layer: int) -> bool:
        return (self.exit_layer is None or layer < self.exit_layer) and layer not in self.skip_attn

    def runs_mlp(self, layer: int) -> bool:
        return (self.exit_layer is None or layer < self.exit_layer) and layer not in self.skip_mlp

    def attn_layers(self, num_layers: int) -> frozenset[int]:
        """Layers whose KV this plan writes (and reads)."""
        return frozenset(i for i in range(num_layers) if self.runs_attn(i))

    def sparsity(self, num_layers: int) -> float:
        """Fraction of sub-layers skipped."""
        run = sum(self.runs_attn(i) + self.runs_mlp(i) for i in range(num_layers))
        return 1.0 - run / (2 * num_layers)

    @property
    def name(self) -> str:
        parts = [self.weights] if self.quantized else []
        if self.skip_attn or self.skip_mlp:
            parts.append(f"skip(a{len(self.skip_attn)},m{len(self.skip_mlp)})")
        if self.exit_layer is not None:
            parts.append(f"exit{self.exit_layer}")
        if self.vocab:
            parts.append("vocab")
        return "+".join(parts) or "full"


FULL = ExecutionPlan()


def Full() -> ExecutionPlan:  # noqa: N802 - reads as a type in plan expressions
    """The target model itself."""
    return FULL


def LayerSkip(attn: set[int] | frozenset[int] = frozenset(), mlp: set[int] | frozenset[int] = frozenset()) -> ExecutionPlan:  # noqa: N802
    """Skip the given attention and MLP sub-layers."""
    return ExecutionPlan(skip_attn=frozenset(attn), skip_mlp=frozenset(mlp))


def Int8() -> ExecutionPlan:  # noqa: N802
    """Per-row int8 weights, fp32 activations."""
    return ExecutionPlan(weights="int8")


def Act8() -> ExecutionPlan:  # noqa: N802
    """The target's own weight blocks, activations quantized to int8 per 32 values (integer dot products)."""
    return ExecutionPlan(weights="a8")


def LowBit() -> ExecutionPlan:  # noqa: N802
    """Each projection in the format its sensitivity allows (drafters/fames.py), int8 activations."""
    return ExecutionPlan(weights="lowbit")


def Int4() -> ExecutionPlan:  # noqa: N802
    """Group-wise int4 weights (fp16 scale and min per 64 columns), fp32 activations."""
    return ExecutionPlan(weights="int4")


def PrunedVocab() -> ExecutionPlan:  # noqa: N802
    """Score only the draft vocabulary (runtime/vocab.py) instead of every row of the head."""
    return ExecutionPlan(vocab=True)


def EarlyExit(layer: int) -> ExecutionPlan:  # noqa: N802
    """Exit after `layer` decoder layers."""
    if layer < 1:
        raise ValueError(f"early exit layer must be >= 1, got {layer}")
    return ExecutionPlan(exit_layer=layer)
