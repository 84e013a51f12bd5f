"""Acceptance: which drafted tokens the target keeps. Lossless by construction.

Letters follow Leviathan et al. / SpecInfer: p = target distribution, q = draft distribution.
Greedy: follow the target's argmax down the tree; the first miss yields the bonus token.
Sampling: recursive rejection sampling over each node's children (SpecInfer): child x drawn from q is
accepted with prob min(1, p(x)/q(x)); on rejection p <- norm(max(0, p - q)). A deterministic draft
(prompt lookup, argmax) has one-hot q. When every child is rejected, the final token is sampled from
the residual p (recovered token); past the last accepted leaf it is the bonus token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casspec.config import SamplingConfig
from casspec.tree import DraftTree
from casspec.verify.sampling import logits_to_probs, sample, uniform


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
    """Walk the tree with the target's logits [N, V]."""
    if cfg.is_greedy:
        return _accept_greedy(tree, logits)
    return _accept_sampling(tree, logits, cfg, generator)


def _accept_greedy(tree: DraftTree, logits: torch.Tensor) -> AcceptResult:
    target = logits.argmax(-1).tolist()  # [N]
    node, path = 0, [0]
    while True:
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == target[node]), None)
        if nxt is None:
            return AcceptResult(path, [tree.tokens[i] for i in path[1:]] + [target[node]])
        node = nxt
        path.append(node)


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
