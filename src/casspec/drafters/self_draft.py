"""Self-drafting: the target model itself under a cheaper ExecutionPlan (a DSIA "virtual" draft model).

Draft forwards share the target's KV cache: they write into the tree's own slots past the committed
length, which verification later overwrites. Each node records which layers' KV it has, so a drafter
re-feeds only the path nodes it lacks (e.g. tokens proposed by prompt lookup, or by a plan that skipped
layers this plan runs) in the same forward as its first draft step.

At temperature > 0 a draft samples in its own (possibly pruned) vocabulary, all rows of a depth in one
call (`pick_drafts`). Under the "gumbel" rule the draft token is the coupled sample of the draft's
logits with the target's noise for that position (verify/coupling.py), and runner-up siblings are the
next best perturbed scores; under "rejection" it is a multinomial draw whose distribution q is recorded.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from casspec.runtime.plans import ExecutionPlan
from casspec.runtime.runner import TargetRunner
from casspec.state import DecodeState
from casspec.tree import DraftTree
from casspec.verify.coupling import coupled_draws, noise_keys
from casspec.verify.sampling import logits_to_probs, sample, top_probs


def _identity(conf: float) -> float:
    return conf


@dataclass
class DraftPick:
    """A draft's choice below one leaf: its token, then runner-ups, as columns of the draft's logits."""

    cols: list[int]  # drafted column first, then runner-ups best first
    probs: list[float]  # each one's probability under the draft's (filtered) distribution
    q: torch.Tensor | None = None  # [V] full-vocabulary distribution the drafted token was drawn from (rejection)


def pick_drafts(logits: torch.Tensor, states: list[DecodeState], positions: list[int], ids: torch.Tensor | None,
                runners: int, vocab_size: int) -> list[DraftPick]:
    """Each row's drafted column and up to `runners` runner-ups.

    logits: [R, V'] draft logits (V' = len(ids) for a pruned head, whose column j is token ids[j]); row r
    belongs to states[r] and drafts the token at position positions[r]. Rows with the same sampling filters
    are sampled in one batched call.
    """
    picks: list[DraftPick] = [DraftPick([], [])] * len(states)
    groups: dict[tuple, list[int]] = {}
    for r, st in enumerate(states):
        groups.setdefault((st.sampling.is_greedy, st.sampling.rule, st.sampling.filters), []).append(r)
    for rows in groups.values():
        lg = logits if len(rows) == len(states) else logits[rows]  # [len(rows), V']
        cfg = states[rows[0]].sampling
        if cfg.is_greedy:
            for r, (best, best_p) in zip(rows, top_probs(lg, runners + 1)):
                picks[r] = DraftPick(best, best_p)
        elif cfg.is_coupled:
            keys = torch.cat([noise_keys(states[r].sampling.seed, [positions[r]]) for r in rows])
            cols, probs = coupled_draws(lg, cfg, keys, ids, runners + 1)  # [len(rows), 1 + runners], -1: none
            for r, cr, pr in zip(rows, cols.tolist(), probs.tolist()):
                picks[r] = DraftPick([j for j in cr if j >= 0], [p for j, p in zip(cr, pr) if j >= 0])
        else:
            probs = logits_to_probs(lg, cfg)  # [len(rows), V']
            for r, p in zip(rows, probs):
                j = sample(p, states[r].generator)
                top = torch.topk(p, min(runners + 1, len(p)))
                runner = [(v, i) for v, i in zip(top.values.tolist(), top.indices.tolist()) if i != j][:runners]
                q = p if ids is None else p.new_zeros(vocab_size).index_copy_(0, ids, p)
                picks[r] = DraftPick([j] + [i for _, i in runner], [float(p[j])] + [v for v, _ in runner], q)
    return picks


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
            t1 = time.perf_counter()
            picks = pick_drafts(logits, [state] * len(frontier), [tree.base + tree.depth[f] + 1 for f in frontier],
                                ids, siblings, self.runner.vocab_size)
            if not state.sampling.is_greedy:  # the sampling work of this step, for DyTC's cost model
                state.times.record(f"sample:{self.name}", len(frontier), 0, time.perf_counter() - t1)
            for leaf, pick in zip(frontier, picks):
                children = self.expand(tree, leaf, pick, ids, siblings, score, min_sibling_p_acc)
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
        not have drafted (greedy: its argmax; coupled sampling: its coupled sample for that position), and
        this plan's own token replaces it. Returns the new chain end.
        """
        t0 = time.perf_counter()
        ids = self.token_ids(state)
        parent = tree.parents[chain[0]]
        rows = [parent] + chain[:-1]
        logits = self._forward(tree, state, rows)  # [len(chain), V]
        state.stats.drafter(self.name).forwards += 1
        if state.sampling.is_coupled:
            picks = pick_drafts(logits, [state] * len(rows), [tree.base + tree.depth[n] + 1 for n in rows], ids, 0,
                                self.runner.vocab_size)
        else:  # greedy, and the rejection rule (a deterministic correction is a one-hot draft)
            picks = [DraftPick(best, best_p) for best, best_p in top_probs(logits, 1)]
        if not all(p.cols for p in picks):  # a row with non-finite draft logits: keep the chain as it is
            return chain[-1]
        mine = [p.cols[0] if ids is None else int(ids[p.cols[0]]) for p in picks]
        keep = next((j for j, node in enumerate(chain) if tree.tokens[node] != mine[j]), len(chain))
        end = chain[keep - 1] if keep else parent
        if keep < len(chain):
            tree.truncate(chain[keep])
            conf = picks[keep].probs[0]
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
        logits_rows = torch.tensor([rows.index(f) for f in frontier], dtype=torch.long)
        t0 = time.perf_counter()
        logits = self.runner.forward_batch([tree.segment(state.cache, rows)], self.plan, logits_rows)
        self.runner.synchronize()
        state.times.record(self.name, len(rows), state.cache.length, time.perf_counter() - t0)
        for r in rows:
            tree.kv_layers[r] = tree.kv_layers[r] | self.kv_layers
        return logits

    def expand(self, tree: DraftTree, leaf: int, pick: DraftPick, ids: torch.Tensor | None, siblings: int,
               score: Callable[[float], float], min_sibling_p_acc: float = 0.0) -> list[int]:
        """Add the drafted child of `leaf` (first) and up to `siblings` runner-up children from `pick`."""
        if tree.is_full or not pick.cols:
            return []
        token_of = (lambda j: j) if ids is None else (lambda j: int(ids[j]))
        conf = pick.probs[0]
        main = score(conf)  # calibrated P(drafted token accepted)
        out = [tree.add(leaf, token_of(pick.cols[0]), self.name, conf, tree.p_acc[leaf] * main, pick.q)]
        for i, p in zip(pick.cols[1:siblings + 1], pick.probs[1:siblings + 1]):
            # a runner-up is accepted only when the drafted token is not, then as often as the
            # drafter puts it among the remaining mass: P = (1 - main) * p / (1 - conf)
            p_acc = tree.p_acc[leaf] * (1.0 - main) * min(1.0, p / max(1.0 - conf, 1e-6))
            if not tree.is_full and p > 0 and p_acc >= min_sibling_p_acc:
                out.append(tree.add(leaf, token_of(i), self.name, p, p_acc))
        return out
