"""Acceptance EMA and calibration, latency regression (CAS-Spec sec. 4.2, 4.3). Fast, numpy only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.latency import (
    _REFIT_TOL,
    FEATURES,
    LatencyModel,
    calibration_grid,
    features,
    query_bucket,
)

# ---------------------------------------------------------------- acceptance: EMA


def test_ema_one_window_is_paper_formula():
    est = AcceptanceEstimator(prior=0.6, lam=0.7, window=20)
    outcomes = [True] * 15 + [False] * 5
    for a in outcomes[:19]:
        est.observe(a)
        assert est.alpha == 0.6  # partial window: no change
    est.observe(outcomes[19])
    assert est.alpha == pytest.approx(0.7 * 0.6 + 0.3 * 0.75, abs=1e-12)
    for _ in range(5):
        est.observe(False)  # next window still partial
    assert est.alpha == pytest.approx(0.7 * 0.6 + 0.3 * 0.75, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), max_size=120), st.floats(0, 1), st.integers(1, 25))
def test_ema_matches_reference_over_whole_windows(outcomes, prior, window):
    est = AcceptanceEstimator(prior=prior, window=window)
    est.observe_many(outcomes)
    alpha = prior
    for i in range(len(outcomes) // window):
        chunk = outcomes[i * window : (i + 1) * window]
        alpha = 0.7 * alpha + 0.3 * (sum(chunk) / window)
    assert est.alpha == pytest.approx(alpha, abs=1e-12)
    assert 0.0 <= est.alpha <= 1.0


def test_alpha_tracks_drafter_whose_quality_changes():
    rng = np.random.default_rng(0)
    est = AcceptanceEstimator(prior=0.5)
    for u in rng.random(200):
        est.observe(bool(u < 0.9))
    assert est.alpha == pytest.approx(0.9, abs=0.1)
    for u in rng.random(200):
        est.observe(bool(u < 0.3))
    assert est.alpha == pytest.approx(0.3, abs=0.12)


def test_runner_up_siblings_feed_calibration_not_alpha():
    est = AcceptanceEstimator(prior=0.9, window=5)
    for _ in range(20):
        est.observe(False, confidence=0.05, in_alpha=False)  # rejected runner-ups
        est.observe(True, confidence=0.95)  # the drafter's own, accepted choices
    assert est.alpha > 0.95
    assert est.token_prob(0.05) < 0.5 < est.token_prob(0.95)


# ---------------------------------------------------------------- acceptance: calibration


@settings(max_examples=30, deadline=None)
@given(st.floats(0, 1), st.one_of(st.none(), st.floats(-1, 2)))
def test_token_prob_equals_alpha_without_data(prior, confidence):
    est = AcceptanceEstimator(prior=prior)
    assert est.token_prob(confidence) == pytest.approx(prior, abs=1e-12)


def test_token_prob_none_or_nan_confidence_is_alpha():
    est = AcceptanceEstimator(prior=0.4)
    est.observe_many([True] * 40, [0.95] * 40)
    assert est.token_prob(None) == est.alpha
    assert est.token_prob(float("nan")) == est.alpha
    assert est.token_prob(0.95) > est.alpha


def _confidence_dependent(est: AcceptanceEstimator, n: int, seed: int = 0) -> None:
    """Feed tokens accepted iff a hidden uniform < confidence (true rate = confidence)."""
    rng = np.random.default_rng(seed)
    for conf, u in zip(rng.random(n), rng.random(n)):
        est.observe(bool(u < conf), float(conf))


def test_calibration_learns_confidence_dependent_rates():
    est = AcceptanceEstimator(prior=0.7)
    _confidence_dependent(est, 3000)
    assert est.alpha == pytest.approx(0.5, abs=0.15)
    hi, lo = est.token_prob(0.95), est.token_prob(0.2)
    assert hi > lo + 0.4
    assert hi == pytest.approx(0.95, abs=0.15)  # bin [0.9, 1.0): true rate 0.95
    assert lo == pytest.approx(0.25, abs=0.15)  # bin [0.2, 0.3): true rate 0.25
    probs = [p for _, p, _ in est.calibration()]
    assert probs[-1] > probs[len(probs) // 2] > probs[0]


def test_calibration_bins_relax_to_alpha_without_data():
    est = AcceptanceEstimator(prior=0.5)
    est.observe_many([False] * 20, [0.9] * 20)
    assert est.token_prob(0.9) < 0.2
    for _ in range(3000):  # many windows with no confidence: bin counts decay away
        est.observe(True)
    assert est.token_prob(0.9) == pytest.approx(est.alpha, abs=0.02)


def test_calibration_follows_quality_drift_at_alpha_speed():
    """Same confidences, but every token gets 1.5 nats of log-odds harder (e.g. a harder domain)."""
    est = AcceptanceEstimator(prior=0.5)
    _confidence_dependent(est, 2000)
    rng = np.random.default_rng(5)
    true = lambda c: 1 / (1 + np.exp(1.5 - np.log(c / (1 - c))))  # noqa: E731
    for conf, u in zip(rng.random(200), rng.random(200)):  # ten windows
        est.observe(bool(u < true(conf)), float(conf))
    centres = np.arange(0.05, 1.0, 0.1)
    stale = np.mean([abs(c - true(c)) for c in centres])  # error of the pre-drift map: ~0.2
    err = np.mean([abs(est.token_prob(c) - true(c)) for c in centres])
    assert err < 0.12 < stale  # 0.12: 99th percentile over seeds


def test_acceptance_state_dict_round_trip():
    est = AcceptanceEstimator()
    _confidence_dependent(est, 537, seed=1)  # ends mid-window
    clone = AcceptanceEstimator()
    clone.load_state_dict(json.loads(json.dumps(est.state_dict())))
    for c in (None, 0.05, 0.5, 0.97):
        assert clone.token_prob(c) == est.token_prob(c)
    for e in (est, clone):
        e.observe_many([True] * 30, [0.8] * 30)
    assert clone.alpha == est.alpha and clone.token_prob(0.8) == est.token_prob(0.8)
    with pytest.raises(ValueError):
        AcceptanceEstimator(n_bins=5).load_state_dict(est.state_dict())


# ---------------------------------------------------------------- latency

TRUE_W = np.array([5e-3, 4e-4, 2e-3, 5e-5])  # s, s/token, s/ktoken, s/(token*ktoken)
CTXS = (0, 512, 1024, 2048, 4096)


def _t_linear(n: int, ctx: int, w: np.ndarray = TRUE_W) -> float:
    return float(features(n, ctx) @ w)


def _calibrate(model: LatencyModel, fn, reps: int = 3, noise: float = 0.01, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        for n in calibration_grid(32):
            for ctx in CTXS:
                model.observe("full", n, ctx, fn(n, ctx) * (1 + noise * rng.standard_normal()))


def test_calibration_grid_and_buckets():
    assert calibration_grid() == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert calibration_grid(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert calibration_grid(1) == [1]
    buckets = [query_bucket(n) for n in (1, 4, 5, 6, 7, 9, 17, 33, 100)]
    assert buckets == [1, 4, 6, 6, 8, 12, 24, 48, 128]
    assert len(features(3, 1000)) == len(FEATURES)


@pytest.mark.parametrize("kwargs", [dict(forget=1.0, bucket_correction=False), dict()])
def test_fit_recovers_known_linear_model(kwargs):
    model = LatencyModel(**kwargs)
    _calibrate(model, _t_linear)
    for n in (1, 5, 10, 20, 32):
        for ctx in (100, 1500, 3000):
            assert model.predict("full", n, ctx) == pytest.approx(_t_linear(n, ctx), rel=0.03)
    if not model.bucket_correction:
        w = np.array([model.weights("full")[f] for f in FEATURES])
        np.testing.assert_allclose(w, TRUE_W, rtol=0.1)


def test_forget_one_is_exact_batch_blr():
    model = LatencyModel(prior_var=1.0, noise_var=1e-6, rel_noise=0.02, forget=1.0)
    rng = np.random.default_rng(3)
    xs, ts = [], []
    for _ in range(40):
        n, ctx = int(rng.integers(1, 33)), int(rng.integers(0, 4096))
        t = _t_linear(n, ctx) * (1 + 0.02 * rng.standard_normal())
        model.observe("p", n, ctx, t)
        xs.append(features(n, ctx)), ts.append(t)
    x, t = np.array(xs), np.array(ts)
    r = 1e-6 + (0.02 * t) ** 2
    precision = np.eye(4) + (x.T / r) @ x
    mean = np.linalg.solve(precision, (x.T / r) @ t)
    w = np.array([model.weights("p")[f] for f in FEATURES])
    np.testing.assert_allclose(w, mean, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("forget", [1.0, 0.99])
def test_online_updates_follow_changed_regime(forget):
    model = LatencyModel(forget=forget)
    _calibrate(model, _t_linear)
    slow = lambda n, ctx: 1.5 * _t_linear(n, ctx)  # noqa: E731  e.g. throttled clock
    before = model.predict("full", 4, 1000)
    rng = np.random.default_rng(1)
    for _ in range(300):
        n, ctx = int(rng.choice([1, 2, 4, 8, 16])), int(rng.integers(500, 3000))
        model.observe("full", n, ctx, slow(n, ctx))
    after = model.predict("full", 4, 1000)
    assert abs(after - slow(4, 1000)) < abs(before - slow(4, 1000))
    if forget < 1.0:  # forgetting: fully adapted within a few hundred forwards
        assert after == pytest.approx(slow(4, 1000), rel=0.03)


# CPU forward times (ms) of a 16-matmul MLP stack, measured with stock torch kernels on 2 cores:
# t(2)/t(1) = 2 and flat stretches (3-4, 6-8, 12-24), which no linear model in n fits.
_CPU_MS = {1: 14.5, 2: 28.6, 3: 36.8, 4: 36.5, 6: 43.1, 8: 44.0,
           12: 52.3, 16: 51.7, 24: 54.0, 32: 72.6}  # fmt: skip


def _t_piecewise(n: int, ctx: int) -> float:
    ns = sorted(_CPU_MS)
    return float(np.interp(n, ns, [_CPU_MS[k] for k in ns])) * 1e-3 * (1 + 0.15 * ctx / 1000)


def test_bucket_correction_fits_piecewise_cpu_curve():
    errs = {}
    for bc in (False, True):
        model = LatencyModel(bucket_correction=bc)
        _calibrate(model, _t_piecewise)
        held_out = [(n, c) for n in calibration_grid(32) for c in (256, 1536, 3000)]
        rel = [abs(model.predict("full", n, c) / _t_piecewise(n, c) - 1) for n, c in held_out]
        errs[bc] = np.mean(rel)
    assert errs[True] < 0.03
    assert errs[True] < errs[False] / 4


def test_cached_corrections_stay_within_tolerance_of_a_refit():
    """Bucket corrections and predictions are cached between observations (the decode loop asks for the same
    ones many times a step); whatever the updates, a cached prediction is within _REFIT_TOL-ish of what a
    refit from scratch gives."""
    model = LatencyModel()
    _calibrate(model, _t_piecewise)
    rng = np.random.default_rng(5)
    worst = 0.0
    for i in range(400):
        scale = 1.0 + 0.5 * (i >= 200)  # the machine slows down halfway
        n, ctx = int(rng.choice([1, 1, 2, 3, 4, 8])), int(rng.integers(200, 3000))
        model.observe("full", n, ctx, scale * _t_piecewise(n, ctx) * (1 + 0.03 * rng.standard_normal()))
        queries = [(int(rng.integers(1, 17)), int(rng.integers(0, 4000))) for _ in range(4)]
        cached = [model.predict("full", q, c) for q, c in queries]
        fit = model._plans["full"]
        fit.corr_cache.clear(), fit.memo.clear()
        exact = [model.predict("full", q, c) for q, c in queries]
        worst = max(worst, max(abs(a / b - 1) for a, b in zip(cached, exact)))
    assert 0 < worst < 2.5 * _REFIT_TOL


def test_relative_error_is_reported_before_update():
    model = LatencyModel()
    model.observe("full", 1, 0, 0.01)
    assert model.relative_error() == {}  # first observation: nothing to compare against
    model.observe("full", 1, 0, 0.02)
    assert model.relative_error()["full"] == pytest.approx(0.5, rel=0.05)  # predicted ~0.01
    _calibrate(model, _t_linear, noise=0.0)
    model.observe("draft", 1, 0, 0.004)
    assert set(model.relative_error()) == {"full"}
    assert 0 <= model.relative_error()["full"] < 0.5


def test_latency_state_dict_round_trip_and_unknown_plan():
    model = LatencyModel()
    _calibrate(model, _t_piecewise, reps=1)
    model.observe("skip40", 1, 300, 0.006)
    clone = LatencyModel()
    clone.load_state_dict(json.loads(json.dumps(model.state_dict())))
    for plan in ("full", "skip40"):
        for n, c in ((1, 300), (5, 2000), (32, 4096), (64, 100)):
            assert clone.predict(plan, n, c) == model.predict(plan, n, c)
            assert clone.predict_std(plan, n, c) == model.predict_std(plan, n, c)
    assert clone.relative_error() == model.relative_error()
    for m in (model, clone):
        m.observe("full", 3, 777, 0.05)
    assert clone.predict("full", 3, 777) == model.predict("full", 3, 777)
    assert clone.knows("full") and not clone.knows("early_exit")
    with pytest.raises(KeyError):
        clone.predict("early_exit", 1, 0)


def test_predictions_positive_and_uncertainty_shrinks():
    model = LatencyModel()
    model.observe("full", 8, 1000, 0.02)
    assert model.predict("full", 1, 0) >= 1e-6
    wide = model.predict_std("full", 32, 4000)
    _calibrate(model, _t_linear)
    assert 0 < model.predict_std("full", 32, 4000) < wide
    with pytest.raises(ValueError):
        model.observe("full", 1, 0, 0.0)
