"""Hardware-aware latency prediction (CAS-Spec, arXiv 2510.26843, sec. 4.3).

One forward of an execution plan over `n_query` new tokens with `ctx_len` cached tokens is
modelled as a roofline-style linear function of

    x = [1, n, c, n*c],   n = n_query (tokens), c = ctx_len / 1000 (kilotokens)

with weights w fitted per plan by Bayesian linear regression (Gaussian prior w ~ N(0, prior_var*I),
Gaussian noise), updated online in covariance (recursive least squares / Kalman) form, O(d^2):

    r = noise_var + (rel_noise * t)^2        # timing noise grows with the time measured
    K = S x / (x' S x + r);  w += K (t - x'w);  S -= K x' S

`forget` < 1 is directional forgetting (Kulhavy & Karny 1984): before each update the covariance
is inflated by a factor 1/forget along the direction the new x excites only,
S += (1/forget - 1) S x x' S / (x' S x), so the fit follows a changed regime within about
1/(1-forget) forwards, while what was learnt in directions not being observed (e.g. the n_query
slope while only n=1 drafts run) is kept as is, with no covariance wind-up. forget=1 is exact
batch BLR.

Per-n_query-bucket correction (optional, on by default): on CPU t(n) is piecewise (GEMV at n=1,
GEMM tiles beyond; t(2)/t(1) of 1.6-2 is common), which no linear model in n fits. Buckets are the
calibration grid (1,2,3,4,6,8,12,16,...; n goes to the smallest grid value >= n). Each bucket keeps
its last `bucket_keep` forwards (n, ctx, t), and the prediction is multiplied by
exp(a + g * (c - c_mean)), where a and g are a ridge fit (ridge 0.5 on both) of the log ratios
log(t_i / x_i'w) of those forwards to the *current* linear prediction, with c in kilotokens
centred on the bucket's mean ctx. A bucket seen at one ctx gets a constant factor (g = 0); one
seen across ctx also corrects the ctx slope. Residuals are recomputed when the bucket gets a forward
and whenever the linear part has moved by more than `_REFIT_TOL` at the bucket's mean point since its
last fit, so the correction never goes stale by more than that; buckets without data get factor 1. On
a measured CPU curve this cuts held-out error from ~19% to ~1% (tests/test_scheduler_math.py).

The model runs in the decode loop: every step observes the target's forward and its sampling work, and
DyTC predicts ten or more (plan, n) pairs. Its 4-dimensional algebra is plain Python floats (numpy's
per-call overhead made an observe cost ~90 us, ~1% of a SmolLM2 step on an AVX2 CPU, twice a step).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

FEATURES = ("1", "n_query", "ctx_len", "n_query*ctx_len")  # roofline-style features per forward
CTX_SCALE = 1000.0  # ctx_len enters the features in kilotokens
_D = len(FEATURES)
_MIN_SECONDS = 1e-6
_BUCKET_SHRINK = 0.5  # ridge pulling a bucket's log correction (level and ctx slope) toward 0
_MAX_LOG_CORR = 3.0  # |log correction| cap, against wild ctx extrapolation
_MEMO_SIZE = 256  # predictions kept between observations of a plan
_REFIT_TOL = 0.01  # a bucket's correction is refit once the linear part moved this much (relative) at its data


def features(n_query: int, ctx_len: int) -> list[float]:
    """Scaled feature vector [1, n, c, n*c] with c = ctx_len / 1000; length 4."""
    n = float(n_query)
    c = float(ctx_len) / CTX_SCALE
    return [1.0, n, c, n * c]


def _grid_values():
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, ... (powers of two and 1.5x between)."""
    yield from (1, 2, 3)
    p = 4
    while True:
        yield p
        yield p + p // 2
        p *= 2


def calibration_grid(max_query: int = 32) -> list[int]:
    """Query sizes to time at startup: the bucket grid up to max_query, plus max_query itself."""
    if max_query < 1:
        raise ValueError(f"max_query must be >= 1, got {max_query}")
    grid = []
    for g in _grid_values():
        if g > max_query:
            break
        grid.append(g)
    if grid[-1] != max_query:
        grid.append(max_query)
    return grid


def query_bucket(n_query: int) -> int:
    """Residual-correction bucket of a query size: smallest grid value >= n_query."""
    if 0 <= n_query < len(_SMALL_BUCKETS):
        return _SMALL_BUCKETS[n_query]
    for g in _grid_values():
        if g >= n_query:
            return g
    raise AssertionError("unreachable")


# A greedy verify reads only each row's argmax, through the argmax head where the target has one
# (runtime/argmax_head.py): a cheaper forward than the full head's, most of all per extra row (Gemma's 262k head).
# Timed under its own key, so that trees are priced at what greedy verification costs and sampled ones at the
# full head's: in one key, the row counts DyTC verifies were learnt at the cheap cost and those it does not at
# the calibration's full-head cost, which kept greedy trees at 3 rows where 12 paid.
GREEDY_VERIFY = "full:argmax"


def verify_key(latency: LatencyModel, greedy: bool) -> str:
    """The latency-model key of a target verify: the argmax head's for greedy when measured, else "full"."""
    return GREEDY_VERIFY if greedy and latency.knows(GREEDY_VERIFY) else "full"


_SMALL_BUCKETS = tuple(next(g for g in _grid_values() if g >= n) for n in range(257))  # query_bucket, precomputed


class ForwardTime(NamedTuple):
    """One timed forward (or the sampling work on its logits): plan key, query rows, context length, seconds."""

    plan: str
    n_query: int
    ctx_len: int
    seconds: float


@dataclass
class ForwardTimes:
    """The timings of one step, in the order they were taken. Drafters and the decoding loop record into it,
    the scheduler's `observe` receives it, and `LatencyModel.observe_all` learns from it."""

    _records: list[ForwardTime] = field(default_factory=list)

    def record(self, plan: str, n_query: int, ctx_len: int, seconds: float) -> None:
        self._records.append(ForwardTime(plan, n_query, ctx_len, seconds))

    def __iter__(self) -> Iterator[ForwardTime]:
        return iter(self._records)

    def total(self) -> float:
        """Seconds of all records together."""
        return sum(r.seconds for r in self._records)

    def clear(self) -> None:
        self._records.clear()


@dataclass
class _PlanFit:
    """Posterior and bookkeeping for one plan."""

    mean: list[float]  # [4] posterior mean of w
    cov: list[list[float]]  # [4, 4] posterior covariance of w
    buckets: dict[int, deque] = field(default_factory=dict)  # bucket -> deque of (n, ctx, t)
    recent_err: deque = field(default_factory=lambda: deque(maxlen=100))
    num_obs: int = 0
    # bucket -> (a, g, c_mean, n_mean, linear prediction at (n_mean, c_mean) when fitted); a bucket's entry
    # goes when it gets a forward, and is refit when the linear part has moved (_REFIT_TOL)
    corr_cache: dict[int, tuple[float, float, float, float, float]] = field(default_factory=dict)
    memo: dict[tuple[int, int], float] = field(default_factory=dict)  # (n, ctx) -> prediction since the last observe


class LatencyModel:
    """Predicts seconds for one forward of a given execution plan: t(plan, n_query, ctx_len).
    Bayesian linear regression per plan key, fit from a short calibration at engine creation
    and refined online from measured forward times."""

    def __init__(
        self,
        prior_var: float = 1.0,
        noise_var: float = 1e-6,
        rel_noise: float = 0.02,
        forget: float = 0.99,
        bucket_correction: bool = True,
        bucket_keep: int = 16,
        recent: int = 100,
    ) -> None:
        if prior_var <= 0 or noise_var <= 0 or rel_noise < 0:
            raise ValueError("need prior_var > 0, noise_var > 0, rel_noise >= 0")
        if not 0.0 < forget <= 1.0 or bucket_keep < 1 or recent < 1:
            raise ValueError("need 0 < forget <= 1, bucket_keep >= 1, recent >= 1")
        self.prior_var = float(prior_var)
        self.noise_var = float(noise_var)
        self.rel_noise = float(rel_noise)
        self.forget = float(forget)
        self.bucket_correction = bool(bucket_correction)
        self.bucket_keep = int(bucket_keep)
        self.recent = int(recent)
        self._plans: dict[str, _PlanFit] = {}

    def knows(self, plan: str) -> bool:
        """Whether any forward of this plan has been observed."""
        fit = self._plans.get(plan)
        return fit is not None and fit.num_obs > 0

    def plans(self) -> list[str]:
        """Plan keys with data."""
        return [p for p in self._plans if self.knows(p)]

    def drop(self, plan: str) -> None:
        """Drop everything learnt about `plan` (it is then unknown until observed or calibrated again)."""
        self._plans.pop(plan, None)

    def observe(self, plan: str, n_query: int, ctx_len: int, seconds: float) -> None:
        """Add one measured forward time; records the prediction error made before updating."""
        t = float(seconds)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"measured time must be finite and > 0, got {seconds}")
        fit = self._plans.get(plan)
        if fit is None:
            fit = self._new_fit()
            self._plans[plan] = fit
        if fit.num_obs > 0:  # the prediction made for this forward, if one was (memo), else made now
            pred = fit.memo.get((n_query, ctx_len)) or self._predict(fit, n_query, ctx_len)
            fit.recent_err.append(abs(pred - t) / t)
        self._update(fit, features(n_query, ctx_len), t)
        b = query_bucket(n_query)
        bucket = fit.buckets.setdefault(b, deque(maxlen=self.bucket_keep))
        bucket.append((int(n_query), int(ctx_len), t))
        fit.num_obs += 1
        fit.corr_cache.pop(b, None)
        fit.memo.clear()

    def observe_all(self, times: ForwardTimes, learns: Callable[[str], bool] | None = None) -> None:
        """Add every record of `times`, in order, whose plan `learns` accepts (None: every plan); records of
        0 seconds (below the clock's resolution) are skipped. Both decoding loops (DyTC.observe, the batched
        step) learn through here."""
        for t in times:
            if t.seconds > 0 and (learns is None or learns(t.plan)):
                self.observe(t.plan, t.n_query, t.ctx_len, t.seconds)

    def predict(self, plan: str, n_query: int, ctx_len: int) -> float:
        """Posterior mean time in seconds (bucket correction included), at least 1e-6."""
        fit = self._fit(plan)
        t = fit.memo.get((n_query, ctx_len))
        if t is None:
            if len(fit.memo) >= _MEMO_SIZE:  # a plan predicted but not run for a long while
                fit.memo.clear()
            t = fit.memo[n_query, ctx_len] = self._predict(fit, n_query, ctx_len)
        return t

    def predict_std(self, plan: str, n_query: int, ctx_len: int) -> float:
        """Posterior predictive std in seconds (weight uncertainty plus timing noise)."""
        fit = self._fit(plan)
        x = features(n_query, ctx_len)
        pred = self._predict(fit, n_query, ctx_len)
        var_w = _dot(x, _matvec(fit.cov, x))
        corr = self._correction(fit, n_query, ctx_len)
        return math.sqrt(max(var_w, 0.0) * corr * corr + self._noise(pred))

    def weights(self, plan: str) -> dict[str, float]:
        """Posterior mean weights of the linear part (seconds per feature unit, ctx in ktokens)."""
        return dict(zip(FEATURES, self._fit(plan).mean))

    def relative_error(self) -> dict[str, float]:
        """Mean |pred - actual| / actual per plan over recent observations, each prediction made
        before updating with that observation."""
        return {p: float(np.mean(f.recent_err)) for p, f in self._plans.items() if f.recent_err}

    def clear_errors(self) -> None:
        """Forget recorded errors (e.g. after calibration, so reports cover decoding only)."""
        for f in self._plans.values():
            f.recent_err.clear()

    # -- internals ---------------------------------------------------------------------------

    def _new_fit(self) -> _PlanFit:
        fit = _PlanFit(mean=[0.0] * _D, cov=[[self.prior_var * (i == j) for j in range(_D)] for i in range(_D)])
        fit.recent_err = deque(maxlen=self.recent)
        return fit

    def _fit(self, plan: str) -> _PlanFit:
        fit = self._plans.get(plan)
        if fit is None or fit.num_obs == 0:
            raise KeyError(f"no latency data for plan {plan!r}; calibrate it first")
        return fit

    def _noise(self, t: float) -> float:
        """Observation noise variance for a forward taking about t seconds."""
        return self.noise_var + (self.rel_noise * t) ** 2

    def _update(self, fit: _PlanFit, x: list[float], t: float) -> None:
        """One RLS / Kalman step on (x, t) with directional forgetting."""
        cov = fit.cov
        sx = _matvec(cov, x)
        q = _dot(x, sx)
        if self.forget < 1.0 and q > 0.0:
            f = (1.0 / self.forget - 1.0) / q
            cov = [[cov[i][j] + f * sx[i] * sx[j] for j in range(_D)] for i in range(_D)]
            sx = [v / self.forget for v in sx]  # = (inflated cov) @ x
        gain = [v / (_dot(x, sx) + self._noise(t)) for v in sx]
        err = t - _dot(x, fit.mean)
        fit.mean = [m + g * err for m, g in zip(fit.mean, gain)]
        cov = [[cov[i][j] - gain[i] * sx[j] for j in range(_D)] for i in range(_D)]
        fit.cov = [[0.5 * (cov[i][j] + cov[j][i]) for j in range(_D)] for i in range(_D)]

    def _linear(self, fit: _PlanFit, n_query: float, ctx_len: float) -> float:
        """x'w without building arrays (the scheduler calls this in its inner loop)."""
        w0, w1, w2, w3 = fit.mean
        c = ctx_len / CTX_SCALE
        return w0 + w1 * n_query + w2 * c + w3 * n_query * c

    def _predict(self, fit: _PlanFit, n_query: int, ctx_len: int) -> float:
        lin = self._linear(fit, n_query, ctx_len)
        if lin <= 0.0:
            return _MIN_SECONDS
        return max(lin * self._correction(fit, n_query, ctx_len), _MIN_SECONDS)

    def _correction(self, fit: _PlanFit, n_query: int, ctx_len: int) -> float:
        """Multiplicative residual factor for (n_query, ctx_len) (1.0 when off or without data)."""
        if not self.bucket_correction:
            return 1.0
        b = query_bucket(n_query)
        coef = fit.corr_cache.get(b)
        if coef is None or abs(self._linear(fit, coef[3], coef[2] * CTX_SCALE) - coef[4]) > _REFIT_TOL * abs(coef[4]):
            coef = self._fit_bucket(fit, b)
            fit.corr_cache[b] = coef
        a, g, c_mean = coef[:3]
        z = a + g * (ctx_len / CTX_SCALE - c_mean)
        return math.exp(min(max(z, -_MAX_LOG_CORR), _MAX_LOG_CORR))

    def _fit_bucket(self, fit: _PlanFit, b: int) -> tuple[float, float, float, float, float]:
        """Ridge fit of log(t / linear) = a + g * (c - c_mean) on bucket b's stored forwards; returns (a, g, c_mean,
        n_mean, the linear prediction at (n_mean, c_mean)): where to tell that the linear part has moved."""
        ns, cs, ys = [], [], []
        w0, w1, w2, w3 = fit.mean
        for n, ctx, t in fit.buckets.get(b, ()):
            c = ctx / CTX_SCALE
            lin = w0 + w1 * n + w2 * c + w3 * n * c  # (_linear, inlined: this loop runs every step)
            if lin > 0.0:
                ns.append(n)
                cs.append(c)
                ys.append(math.log(t / lin))
        if not ys:
            return 0.0, 0.0, 0.0, float(b), self._linear(fit, b, 0.0)
        c_mean, n_mean = sum(cs) / len(cs), sum(ns) / len(ns)
        a = sum(ys) / (len(ys) + _BUCKET_SHRINK)
        sxx = sum((c - c_mean) ** 2 for c in cs)
        g = sum((c - c_mean) * y for c, y in zip(cs, ys)) / (sxx + _BUCKET_SHRINK)
        return a, g, c_mean, n_mean, self._linear(fit, n_mean, c_mean * CTX_SCALE)

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Per-plan posterior, bucket memory and recent errors as plain JSON-able values."""
        plans = {}
        for p, f in self._plans.items():
            plans[p] = {
                "mean": list(f.mean),
                "cov": [list(row) for row in f.cov],
                "buckets": {str(b): [list(o) for o in q] for b, q in f.buckets.items()},
                "recent_err": [float(e) for e in f.recent_err],
                "num_obs": f.num_obs,
            }
        return {"features": list(FEATURES), "ctx_scale": CTX_SCALE, "plans": plans}

    def load_state_dict(self, d: dict) -> None:
        """Replace all plans with a saved state; hyperparameters stay as constructed. A state of the wrong
        shape (other features, arrays of other sizes, non-finite values) raises ValueError and leaves
        this model unchanged."""
        if not isinstance(d, dict) or not isinstance(d.get("plans"), dict):
            raise ValueError("latency state must be an object with a 'plans' object")
        same = list(d.get("features", [])) == list(FEATURES)
        if not same or float(d.get("ctx_scale", 0)) != CTX_SCALE:
            raise ValueError("latency state was saved with different features; recalibrate")
        plans = {}
        for p, s in d["plans"].items():
            fit = self._new_fit()
            mean, cov = np.array(s["mean"], dtype=float), np.array(s["cov"], dtype=float)
            if mean.shape != (_D,) or cov.shape != (_D, _D) or not (np.isfinite(mean).all() and np.isfinite(cov).all()):
                raise ValueError(f"latency state of plan {p!r} has the wrong shape")
            fit.mean, fit.cov = mean.tolist(), cov.tolist()
            for b, obs in s["buckets"].items():
                q: deque[tuple[int, int, float]] = deque(maxlen=self.bucket_keep)
                q.extend((int(n), int(c), float(t)) for n, c, t in obs)
                if not all(math.isfinite(t) and t > 0 for _, _, t in q):
                    raise ValueError(f"latency state of plan {p!r} holds a non-positive time")
                fit.buckets[int(b)] = q
            fit.recent_err.extend(float(e) for e in s["recent_err"])
            fit.num_obs = int(s["num_obs"])
            plans[p] = fit
        self._plans = plans


def _dot(a: list[float], b: list[float]) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3]


def _matvec(m: list[list[float]], x: list[float]) -> list[float]:
    return [_dot(row, x) for row in m]
