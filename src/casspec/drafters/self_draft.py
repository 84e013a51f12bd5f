"""Self-drafting: the target model itself under a cheaper ExecutionPlan (a DSIA "virtual" draft model).

Draft forwards share the target's KV cache: they write into the tree's own slots past the committed
length, which verification later overwrites. Each node records which layers' KV it has, so a drafter
re-feeds only the path nodes it lacks (e.g. tokens proposed by prompt lookup, or by a plan that skipped
layers this plan runs) in the same forward as its first draft step.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from casspec.state import DecodeState
from casspec.runtime.plans import ExecutionPlan
from casspec.runtime.runner import TargetRunner
from casspec.tree import DraftTree
from casspec.verify.sampling import logits_to_probs, sample


def _identity(conf: float) -> float:
    return conf


class SelfDrafter:
    """Drafts chains (optionally with top-k siblings) below tree leaves under one execution plan."""

    def __init__(self, runner: TargetRunner, plan: ExecutionPlan, name: str | None = None) -> None:
        self.runner = runner
        self.name = name or plan.name
        self.set_plan(plan)

    def set_plan(self, plan: ExecutionPlan) -> None:
        """Switch the execution plan (e.g. when the layer search finds a better skip set)."""
        self.plan = plan
        self.kv_layers = plan.attn_layers(self.runner.num_layers)

    def propose(self, tree: DraftTree, state: DecodeState, leaves: list[int], k: int, *, siblings: int = 0,
                min_conf: float = 0.0, min_p_acc: float = 0.0, min_sibling_p_acc: float = 0.0,
                score: Callable[[float], float] = _identity) -> list[int]:
        """Draft up to k tokens below each leaf, one batched forward per depth.

        A chain stops early when its token's confidence falls below `min_conf` or its estimated path
        acceptance p_acc below `min_p_acc`. `siblings` adds up to that many runner-up tokens as extra
        (unexpanded) children at every step, each only if its p_acc reaches `min_sibling_p_acc`.
        `score` maps a confidence to the acceptance probability used for the nodes' p_acc.
        """
        t0 = time.perf_counter()
        stats = state.stats.drafter(self.name)
        ids = self.token_ids(state)
        new: list[int] = []
        frontier = [f for f in leaves if tree.depth[f] < state.max_depth()]
        for _ in range(k):
            if not frontier or tree.is_full:
                break
            logits = self._forward(tree, state, frontier)  # [len(frontier), V] (pruned head: V')
            stats.forwards += 1
            nxt = []
            for leaf, row in zip(frontier, logits):
                children = self.expand(tree, state, leaf, row, ids, siblings, score, min_sibling_p_acc)
                new += children
                main = children[0] if children else None
                if (main is not None and tree.confidence[main] >= min_conf and tree.p_acc[main] >= min_p_acc
                        and tree.tokens[main] not in state.eos_ids and tree.depth[main] < state.max_depth()):
                    nxt.append(main)
            frontier = nxt
        stats.time += time.perf_counter() - t0
        return new

    def review(self, tree: DraftTree, state: DecodeState, chain: list[int]) -> int:
        """Vertical cascade: check a cheaper drafter's chain (node ids, parent first) with this plan.

        One forward scores every node of the chain; the chain is cut at the first token this plan would
        not have drafted (greedy), and this plan's own token replaces it. Returns the new chain end.
        """
        t0 = time.perf_counter()
        ids = self.token_ids(state)
        parent = tree.parents[chain[0]]
        logits = self._forward(tree, state, [parent] + chain[:-1])  # [len(chain), V]
        state.stats.drafter(self.name).forwards += 1
        best = logits.argmax(-1)
        mine = (best if ids is None else ids[best]).tolist()
        keep = next((j for j, node in enumerate(chain) if tree.tokens[node] != mine[j]), len(chain))
        end = chain[keep - 1] if keep else parent
        if keep < len(chain):
            tree.truncate(chain[keep])
            conf = float(torch.softmax(logits[keep].float(), -1)[best[keep]])
            end = tree.add(end, mine[keep], self.name, conf, tree.p_acc[end] * conf)
        state.stats.drafter(self.name).time += time.perf_counter() - t0
        return end

    def token_ids(self, state: DecodeState) -> torch.Tensor | None:
        """Token id per logit column under this plan (None: the full vocabulary, column j = token j).
        A pruned draft head learns the context's tokens first, so they can be drafted."""
        if not self.plan.vocab:
            return None
        vocab = self.runner.draft_vocab()
        if state.vocab_seen < len(state.tokens):
            vocab.add(state.tokens[state.vocab_seen:])
            state.vocab_seen = len(state.tokens)
        return vocab.ids

    def _forward(self, tree: DraftTree, state: DecodeState, frontier: list[int]) -> torch.Tensor:
        """Run the frontier nodes plus every path node lacking this plan's KV; logits at the frontier."""
        lacking = {n for leaf in frontier for n in tree.path(leaf) if not self.kv_layers <= tree.kv_layers[n]}
        rows = sorted(lacking | set(frontier))
        inputs = tree.forward_inputs(rows)
        logits_rows = torch.tensor([rows.index(f) for f in frontier], dtype=torch.long)
        t0 = time.perf_counter()
        logits = self.runner.forward(inputs.input_ids, inputs.positions, inputs.slots, state.cache,
                                     self.plan, inputs.allowed, inputs.key_positions, logits_rows)
        self.runner.synchronize()
        state.log_forward(self.name, len(rows), time.perf_counter() - t0)
        for r in rows:
            tree.kv_layers[r] = tree.kv_layers[r] | self.kv_layers
        return logits

    def expand(self, tree: DraftTree, state: DecodeState, leaf: int, logits: torch.Tensor,
                ids: torch.Tensor | None, siblings: int, score: Callable[[float], float],
                min_sibling_p_acc: float = 0.0) -> list[int]:
        """Add the drafted child of `leaf` (first) and `siblings` runner-up children."""
        if tree.is_full:
            return []
        token_of = (lambda j: j) if ids is None else (lambda j: int(ids[j]))
        if state.sampling.is_greedy:
            q, probs = None, torch.softmax(logits.float(), dim=-1)  # [V] (or [V'])
            j = int(probs.argmax())
        else:
            probs = logits_to_probs(logits, state.sampling)
            j = sample(probs, state.generator)
            q = probs if ids is None else probs.new_zeros(self.runner.vocab_size).index_copy_(0, ids, probs)
        conf = float(probs[j])
        main = score(conf)  # calibrated P(drafted token accepted)
        out = [tree.add(leaf, token_of(j), self.name, conf, tree.p_acc[leaf] * main, q)]
        if siblings:
            top = torch.topk(probs, siblings + 1)
            for p, i in zip(top.values.tolist(), top.indices.tolist()):
                # a runner-up is accepted only when the drafted token is not, then as often as the
                # drafter puts it among the remaining mass: P = (1 - main) * p / (1 - conf)
                p_acc = tree.p_acc[leaf] * (1.0 - main) * min(1.0, p / max(1.0 - conf, 1e-6))
                if i != j and len(out) <= siblings and not tree.is_full and p > 0 and p_acc >= min_sibling_p_acc:
                    out.append(tree.add(leaf, token_of(i), self.name, p, p_acc))
        return out
