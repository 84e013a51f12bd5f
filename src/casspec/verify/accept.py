"""Acceptance: which drafted tokens the target keeps. Lossless by construction.

Letters follow Leviathan et al. / SpecInfer: p = target distribution, q = draft distribution.
Greedy: follow the target's argmax down the tree; the first miss yields the bonus token.
Sampling, rule "gumbel" (the default): the target's token at each node is its seed-stable coupled sample
(verify/coupling.py: argmax of the filtered, tempered logits plus Gumbel noise fixed by (seed, position)),
and the walk is the greedy one with that token in place of the argmax. The committed tokens are exactly
what `ar` samples for the seed, whatever the tree; q plays no part.
Sampling, rule "rejection": recursive rejection sampling over each node's children (SpecInfer): child x drawn from q is
accepted with prob min(1, p(x)/q(x)); on rejection p <- norm(max(0, p - q)). A deterministic draft
(prompt lookup, argmax) has one-hot q. When every child is rejected, the final token is sampled from
the residual p (recovered token); past the last accepted leaf it is the bonus token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from casspec.config import SamplingConfig
from casspec.tree import DraftTree
from casspec.verify.coupling import coupled_tokens
from casspec.verify.sampling import check_finite, greedy_tokens, logits_to_probs, sample, uniform


@dataclass
class AcceptResult:
    """The accepted path and the tokens it commits."""

    path: list[int]  # node ids, root first
    tokens: list[int]  # accepted draft tokens + the final (bonus or recovered) token

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


def accept(tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig,
           generator: torch.Generator | None = None) -> AcceptResult:
    """Walk the tree with the target's logits [N, V]; raises NonFiniteLogitsError on NaN / inf rows."""
    if cfg.is_greedy:
        return _walk(tree, greedy_tokens(logits).__getitem__)
    if cfg.is_coupled:  # the rows it samples are checked as they are sampled (coupled_tokens, strict)
        return _accept_coupled(tree, logits, cfg)
    check_finite(logits.amax(-1))  # a NaN anywhere in a row makes its max NaN
    return _accept_sampling(tree, logits, cfg, generator)


def _walk(tree: DraftTree, target: Callable[[int], int]) -> AcceptResult:
    """Follow the child whose token is the target's token at each node; the first miss adds the target's
    token there (the bonus token)."""
    node, path = 0, [0]
    while True:
        token = target(node)
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == token), None)
        if nxt is None:
            return AcceptResult(path, [tree.tokens[i] for i in path[1:]] + [token])
        node = nxt
        path.append(node)


def _accept_coupled(tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig) -> AcceptResult:
    """The greedy walk over coupled samples. Node i samples position base + depth[i] + 1: the root alone first
    (when its draft children are wrong, as they mostly are at a low acceptance, nothing else is sampled), then
    every node with children below the root's accepted child in one batched call, a leaf only if the path
    reaches it. A row sampled with NaN or inf logits (or none finite) raises NonFiniteLogitsError; rows never
    sampled play no part in the output (it is `ar`'s for the seed) and are not read."""
    def position(node: int) -> int:
        return tree.base + tree.depth[node] + 1

    def sample(nodes: list[int]) -> None:
        rows = logits[nodes[0]:nodes[0] + 1] if len(nodes) == 1 else logits[nodes]  # [len(nodes), V]; one: a view
        target.update(zip(nodes, coupled_tokens(rows, cfg, [position(i) for i in nodes], strict=True)))

    target: dict[int, int] = {}
    sample([0])
    child = next((c for c in tree.children[0] if tree.tokens[c] == target[0]), None)
    if child is not None:
        inner = [i for i in tree.subtree(child) if tree.children[i]]
        if inner:
            sample(inner)

    def token(node: int) -> int:
        if node not in target:
            sample([node])
        return target[node]

    return _walk(tree, token)


def _accept_sampling(tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig,
                     generator: torch.Generator | None) -> AcceptResult:
    node, path = 0, [0]
    while True:
        p = logits_to_probs(logits[node], cfg)  # [V]
        nxt = None
        for c in tree.children[node]:
            x, q = tree.tokens[c], tree.q[c]
            qx = float(q[x]) if q is not None else 1.0
            if uniform(generator) * qx < float(p[x]):  # u < p(x) / q(x)
                nxt = c
                break
            p = _residual(p, q, x)
        if nxt is None:
            return AcceptResult(path, [tree.tokens[i] for i in path[1:]] + [sample(p, generator)])
        node = nxt
        path.append(node)


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """norm(max(0, p - q)); for one-hot q that is p with x removed."""
    if q is None:
        r = p.clone()
        r[x] = 0.0
    else:
        r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    return r / total if total > 0 else p
