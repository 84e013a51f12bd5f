"""Load-aware DyTC for a batch: how many tokens each running request drafts, and from which drafter.

A batched step costs one draft forward per depth (the rows of every request still drafting at that
depth, in one forward of the self-draft plan) plus one verify forward over every request's tree:

    T = t_verify(sum_i (k_i + 1) + P) - t_verify(P) + sum_d t_draft(#{i : k_i > d}) + overhead

(P = rows of prompt chunks riding in the same verify forward: their cost is paid whatever is drafted)

and request i commits E_i = sum_{j=0..k_i} alpha_i^j tokens in expectation (its chain of k_i drafts
with per-token acceptance alpha_i, plus the bonus token). The planner maximises the batch's goodput
G = sum_i E_i / T by greedy ascent from "nobody drafts" (= batched plain decoding): each move sets one
request's chain (source, length) to the value that raises G most, until no move raises it. Under light
load a draft forward is cheap next to what it saves, so requests draft long chains; as the batch grows
the verify forward turns compute-bound, each extra row costs a full row of work, and drafts shrink down
to none: G never falls below batched `ar`'s as far as the latency model is right (SmartSpec, arXiv
2406.14066, does the same with goodput for one-level drafts; here a request also picks its level).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from casspec.drafters.ngram import NgramDrafter
from casspec.scheduler.latency import LatencyModel, verify_key
from casspec.sizes import MAX_CHAIN

MAX_DRAFT = MAX_CHAIN  # longest chain a request drafts in one step


@dataclass(frozen=True)
class Choice:
    """One request's draft for this step: `k` tokens from `source` (None: no draft)."""

    source: str | None = None
    k: int = 0


@dataclass
class Candidate:
    """What the planner knows about one request: acceptance per source and the longest chain possible."""

    alphas: dict[str, float]  # source -> per-token acceptance estimate (of a chain's first token where next says)
    limits: dict[str, int]  # source -> longest chain (prompt lookup: the tokens it found)
    fixed: Choice | None = None  # a fixed-policy request: its choice is given, only its cost counts
    next: dict[str, float] = field(default_factory=dict)  # source -> acceptance of each later token (else alphas)


class BatchPlanner:
    """Chooses every request's draft so that expected committed tokens per second of the step is largest."""

    def __init__(self, latency: LatencyModel, self_plan: str, lookup: NgramDrafter | None = None) -> None:
        """`lookup`: the prompt-lookup drafter, whose measured `cost` (seconds per lookup) the plan charges."""
        self.latency, self.self_plan, self.lookup = latency, self_plan, lookup
        self.overhead = 0.0  # seconds of a step outside its forwards (planning, masks, accept), learnt online

    def observe_overhead(self, seconds: float) -> None:
        """One step's time outside its forwards (EMA)."""
        self.overhead = 0.9 * self.overhead + 0.1 * max(0.0, seconds)

    def plan(self, requests: list[Candidate], ctx_len: int, extra_rows: int = 0, greedy: bool = False) -> list[Choice]:
        """A Choice per request; `extra_rows` are verify rows of prompt chunks riding in the same forward; `greedy`:
        every request of the step is greedy without logprobs (the verify reads argmaxes only)."""
        step = _Step(self, requests, ctx_len, extra_rows, [r.fixed or Choice() for r in requests],
                     verify=verify_key(self.latency, greedy))
        free = [i for i, r in enumerate(requests) if r.fixed is None]
        while True:
            best, move = step.goodput(), None
            for i in free:
                for c in _moves(requests[i], step.choices[i]):
                    g = step.goodput(i, c)
                    if g > best * (1 + 1e-3):
                        best, move = g, [(i, c)]
            # joint moves: a draft depth is one forward for all, so chains may pay only together
            for k in range(1, MAX_DRAFT + 1):
                joint = [(i, Choice(self.self_plan, min(k, requests[i].limits.get(self.self_plan, 0)))) for i in free]
                joint = [(i, c) for i, c in joint if c.k > 0 and c != step.choices[i]]
                if joint and (g := step.with_choices(joint).goodput()) > best * (1 + 1e-3):
                    best, move = g, joint
            if not move:
                return step.choices
            for i, c in move:
                step.set(i, c)


def _moves(request: Candidate, current: Choice) -> list[Choice]:
    """Every chain this request could draft instead of `current`."""
    return [Choice(src, k) for src, limit in request.limits.items() for k in range(1, limit + 1)
            if Choice(src, k) != current]


def expected_tokens(alpha: float, k: int, then: float | None = None) -> float:
    """Expected committed tokens of a k-token chain (bonus included) whose first token is accepted with
    probability alpha and each later one, given the one before, with `then` (default alpha)."""
    then = alpha if then is None else then
    return 1.0 + sum(alpha * then ** j for j in range(k))


class _Step:
    """Running totals of a candidate step (expected tokens, verify rows, draft rows per depth), so that
    trying one request's alternative costs O(MAX_DRAFT) instead of a pass over the batch."""

    def __init__(self, planner: BatchPlanner, requests: list[Candidate], ctx_len: int, extra_rows: int,
                 choices: list[Choice], memo: dict[tuple[str, int], float] | None = None, verify: str = "full") -> None:
        self.p, self.requests, self.ctx, self.extra_rows, self.verify = planner, requests, ctx_len, extra_rows, verify
        self._memo = {} if memo is None else memo
        self.choices = list(choices)
        self.tokens = sum(self._tokens(i, c) for i, c in enumerate(self.choices))
        self.rows = extra_rows + sum(c.k + 1 for c in self.choices)
        self.depth = [0] * (1 + max([MAX_DRAFT] + [c.k for c in self.choices]))  # chains drafting at depth d
        for c in self.choices:
            self._count(c, +1)
        # prompt chunks riding in the verify forward are paid for whatever is drafted: only the time
        # decoding adds on top of them counts against its tokens (else a big chunk makes drafting look free)
        self._sunk = self._forward(verify, extra_rows) if extra_rows else 0.0

    def with_choices(self, changes: list[tuple[int, Choice]]) -> _Step:
        """A copy with some requests' choices replaced."""
        choices = list(self.choices)
        for i, c in changes:
            choices[i] = c
        return _Step(self.p, self.requests, self.ctx, self.extra_rows, choices, self._memo, self.verify)

    def goodput(self, i: int | None = None, alt: Choice | None = None) -> float:
        """Expected tokens per second now, or with request i's choice replaced by `alt`."""
        if i is None or alt is None:
            return self.tokens / self._seconds()
        old = self.choices[i]
        self._count(old, -1)
        self._count(alt, +1)
        t = self._seconds(alt.k - old.k)
        self._count(alt, -1)
        self._count(old, +1)
        return (self.tokens - self._tokens(i, old) + self._tokens(i, alt)) / t

    def set(self, i: int, choice: Choice) -> None:
        old = self.choices[i]
        self.tokens += self._tokens(i, choice) - self._tokens(i, old)
        self.rows += choice.k - old.k
        self._count(old, -1)
        self._count(choice, +1)
        self.choices[i] = choice

    def _tokens(self, i: int, c: Choice) -> float:
        if not c.k:
            return 1.0
        assert c.source is not None  # a draft of k > 0 tokens has a source
        r = self.requests[i]
        return expected_tokens(r.alphas.get(c.source, 0.0), c.k, r.next.get(c.source))

    def _count(self, c: Choice, sign: int) -> None:
        if c.source == self.p.self_plan:
            for d in range(c.k):
                self.depth[d] += sign

    def _seconds(self, extra_rows: int = 0) -> float:
        drafting = sum(self._forward(self.p.self_plan, n) for n in self.depth if n)
        lookups = (self.p.lookup.cost if self.p.lookup is not None else 2e-5) * len(self.choices)
        verify = max(self._forward(self.verify, self.rows + extra_rows) - self._sunk, 1e-4)  # the fit is not monotone
        return verify + drafting + lookups + self.p.overhead

    def _forward(self, plan: str, rows: int) -> float:
        key = (plan, rows)
        if key not in self._memo:
            self._memo[key] = self.p.latency.predict(plan, rows, self.ctx)
        return self._memo[key]
