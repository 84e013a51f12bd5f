"""Online acceptance-rate estimation for one drafter (CAS-Spec, arXiv 2510.26843, sec. 4.2).

alpha is the probability that a drafted token is accepted given that its parent was accepted.
It is an EMA over windows of H verified tokens:  alpha <- lambda * alpha + (1 - lambda) * rate_H,
with the paper's lambda = 0.7 and H = 20.

Per token, alpha is refined by the drafter's own confidence (softmax probability of the drafted
token, or a normalized n-gram match length for prompt lookup) through a calibration map. [0, 1] is
cut into `n_bins` equal bins; bin b holds a log-odds shift s[b] relative to alpha:

    token_prob(c) = sigmoid(logit(alpha) + s[b]),   b = bin(c)

s[b] is a per-bin logistic-regression intercept (offset logit(alpha)), with a Gaussian prior
N(0, 1/P0): the log-odds form, at alpha = 1/2, of a Beta prior with kappa = `prior_strength`
pseudo-tokens centred on alpha (P0 = kappa/4). It is fitted online by one Newton step per token:

    p = token_prob(c);  I[b] += p (1 - p);  s[b] += (accepted - p) / (I[b] + P0)

(the first token moves a bin about as far as the Beta posterior mean would). So with no data
token_prob == alpha; with alpha steady it converges to the bin's observed rate; and when the
drafter's overall quality drifts, every bin follows alpha at once, since bins only store how much
better or worse than average a confidence level is. At each window boundary the information decays,
I[b] *= bin_decay, and s[b] shrinks toward 0 as the posterior mean would under that loss of
information, so the shape tracks drift and bins that stop receiving data relax back to alpha.

Regimes: a drafter's acceptance depends on how the target picks its token. Greedy compares argmaxes;
coupled sampling compares perturbed argmaxes, which differ more often as the temperature rises (and the
draft's confidence means something else there); rejection sampling accepts by probability ratios. So a
scheduler keeps one estimator per `regime(sampling)`, each started from the drafter's prior: sampled
outcomes never move the greedy estimate, nor one temperature's another's.
"""
from __future__ import annotations

import math
from functools import lru_cache

from casspec.config import SamplingConfig

GREEDY = "greedy"
TEMPERATURE_STEP = 0.25  # sampled regimes bucket the temperature to this step (0.7 and 0.8 share 0.75)
MAX_TEMPERATURE_BUCKET = 2.0  # every hotter setting shares the last bucket

_EPS = 1e-4  # probabilities are clipped to [eps, 1 - eps] before taking log-odds


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def regime(sampling: SamplingConfig) -> str:
    """The acceptance regime of a request: "greedy", or "<rule>@<temperature bucket>" (e.g. "gumbel@0.75")."""
    return GREEDY if sampling.is_greedy else _sampled_regime(sampling.rule, sampling.temperature)


@lru_cache(maxsize=256)
def _sampled_regime(rule: str, temperature: float) -> str:
    t = min(round(temperature / TEMPERATURE_STEP) * TEMPERATURE_STEP, MAX_TEMPERATURE_BUCKET)
    return f"{rule}@{max(t, TEMPERATURE_STEP):g}"


class AcceptanceEstimator:
    """Online per-drafter acceptance estimate: windowed EMA (paper: lambda=0.7, H=20 verified
    tokens), refined per token by the drafter's confidence through a binned log-odds map."""

    def __init__(
        self,
        prior: float = 0.7,
        lam: float = 0.7,
        window: int = 20,
        n_bins: int = 10,
        bin_decay: float = 0.95,
        prior_strength: float = 2.0,
    ) -> None:
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior must be in [0, 1], got {prior}")
        if not 0.0 <= lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {lam}")
        if window < 1 or n_bins < 1:
            raise ValueError(f"window and n_bins must be >= 1, got {window}, {n_bins}")
        if not 0.0 < bin_decay <= 1.0 or prior_strength <= 0.0:
            raise ValueError(
                f"need 0 < bin_decay <= 1 and prior_strength > 0, got {bin_decay}, {prior_strength}"
            )
        self.prior = float(prior)
        self.lam = float(lam)  # paper's lambda: weight of the previous estimate
        self.window = int(window)  # paper's H
        self.n_bins = int(n_bins)
        self.bin_decay = float(bin_decay)
        self.prior_strength = float(prior_strength)  # kappa: pseudo-tokens of each bin's prior
        self._alpha = float(prior)
        self._win_n = 0  # tokens in the current (partial) window
        self._win_acc = 0  # of which accepted
        self._shift = [0.0] * self.n_bins  # s[b]: log-odds offset of bin b from alpha
        self._info = [0.0] * self.n_bins  # I[b]: decayed Fisher information of s[b]
        self._count = [0.0] * self.n_bins  # decayed token count per bin (reporting only)
        self.num_observed = 0  # total verified tokens seen

    def fresh(self) -> AcceptanceEstimator:
        """A new estimator with the same prior and hyperparameters and no data (a new regime's start)."""
        return AcceptanceEstimator(self.prior, self.lam, self.window, self.n_bins, self.bin_decay,
                                   self.prior_strength)

    @property
    def alpha(self) -> float:
        """Current EMA estimate of P(drafted token accepted | parent accepted)."""
        return self._alpha

    def observe(self, accepted: bool, confidence: float | None = None, in_alpha: bool = True) -> None:
        """Record one verified draft token whose parent was accepted (the caller ensures that).

        `in_alpha=False` (a runner-up sibling) feeds only the confidence calibration: alpha is the rate
        of the drafter's own choices, which siblings, mostly rejected by design, would drag down.
        """
        self.num_observed += 1
        if in_alpha:
            self._win_n += 1
            self._win_acc += int(bool(accepted))
        b = self._bin(confidence)
        if b is not None:
            p = self._prob(b)
            self._info[b] += p * (1.0 - p)
            self._shift[b] += (float(bool(accepted)) - p) / (self._info[b] + self._p0)
            self._count[b] += 1.0
        if self._win_n >= self.window:
            self._close_window()

    def observe_many(
        self, accepted: list[bool], confidences: list[float | None] | None = None
    ) -> None:
        """observe() for each token in order (confidences default to None)."""
        confs = confidences if confidences is not None else [None] * len(accepted)
        if len(confs) != len(accepted):
            raise ValueError(f"{len(accepted)} outcomes but {len(confs)} confidences")
        for a, c in zip(accepted, confs):
            self.observe(a, c)

    def token_prob(self, confidence: float | None) -> float:
        """Calibrated acceptance probability of one token given the drafter's confidence."""
        b = self._bin(confidence)
        if b is None:
            return self._alpha
        return self._prob(b)

    @property
    def _p0(self) -> float:
        """Prior precision of a bin's log-odds shift (Beta prior of kappa pseudo-tokens)."""
        return self.prior_strength / 4.0

    def _prob(self, b: int) -> float:
        s = self._shift[b]
        return self._alpha if s == 0.0 else _sigmoid(_logit(self._alpha) + s)

    def calibration(self) -> list[tuple[float, float, float]]:
        """(bin centre, token_prob at that bin, effective count) per bin, for reporting."""
        out = []
        for b in range(self.n_bins):
            centre = (b + 0.5) / self.n_bins
            out.append((centre, self.token_prob(centre), self._count[b]))
        return out

    def _bin(self, confidence: float | None) -> int | None:
        """Bin index of a confidence in [0, 1] (clipped); None for None or NaN."""
        if confidence is None:
            return None
        c = float(confidence)
        if math.isnan(c):
            return None
        c = min(max(c, 0.0), 1.0)
        return min(int(c * self.n_bins), self.n_bins - 1)

    def _close_window(self) -> None:
        """EMA step (alpha <- lambda*alpha + (1-lambda)*rate) and calibration decay."""
        rate = self._win_acc / self._win_n
        self._alpha = self.lam * self._alpha + (1.0 - self.lam) * rate
        self._win_n = 0
        self._win_acc = 0
        d, p0 = self.bin_decay, self._p0
        for b in range(self.n_bins):
            info = self._info[b]
            self._shift[b] *= d * (info + p0) / (d * info + p0)
            self._info[b] = d * info
            self._count[b] *= d

    def state_dict(self) -> dict:
        """Learned state as plain JSON-able values (n_bins included for checking)."""
        return {
            "alpha": self._alpha,
            "win_n": self._win_n,
            "win_acc": self._win_acc,
            "shift": list(self._shift),
            "info": list(self._info),
            "count": list(self._count),
            "num_observed": self.num_observed,
            "n_bins": self.n_bins,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore learned state; hyperparameters (lambda, H, decay) stay as constructed."""
        lengths = {len(d[k]) for k in ("shift", "info", "count")} | {int(d["n_bins"])}
        if lengths != {self.n_bins}:
            raise ValueError(f"state has {d['n_bins']} calibration bins, estimator {self.n_bins}")
        self._alpha = float(d["alpha"])
        self._win_n = int(d["win_n"])
        self._win_acc = int(d["win_acc"])
        self._shift = [float(x) for x in d["shift"]]
        self._info = [float(x) for x in d["info"]]
        self._count = [float(x) for x in d["count"]]
        self.num_observed = int(d["num_observed"])


class RatioEstimator:
    """Observed over predicted successes, with `strength` pseudo-successes at ratio 1 and a decay per
    observation: a multiplicative correction for a heuristic probability (DyTC: runner-up siblings)."""

    def __init__(self, strength: float = 1.0, decay: float = 0.98) -> None:
        if strength <= 0.0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"need strength > 0 and 0 < decay <= 1, got {strength}, {decay}")
        self.strength, self.decay = float(strength), float(decay)
        self._hits = 0.0  # decayed observed successes
        self._expected = 0.0  # decayed sum of the heuristic's probabilities for them

    @property
    def ratio(self) -> float:
        return (self._hits + self.strength) / (self._expected + self.strength)

    def observe(self, success: bool, predicted: float) -> None:
        """One outcome of an event the heuristic gave probability `predicted` (before correction)."""
        self._hits = self.decay * self._hits + float(bool(success))
        self._expected = self.decay * self._expected + min(max(float(predicted), 0.0), 1.0)
