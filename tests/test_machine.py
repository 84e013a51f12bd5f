"""The CPU description reports and calibration keys carry (runtime/machine.py)."""
from __future__ import annotations

from casspec.runtime import machine

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx f16c fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx f16c fma avx2 bmi2
"""
VNNI = ZEN3.replace("bmi2", "bmi2 avx_vnni avx512f avx512_vnni")


def test_parse_names_the_model_and_the_features_that_matter() -> None:
    assert machine.parse_cpuinfo(ZEN3) == {"model": "AMD EPYC 7B13", "features": "avx2 fma f16c"}
    assert machine.parse_cpuinfo(VNNI)["features"] == "avx2 fma f16c avx_vnni avx512f avx512_vnni"
    assert machine.parse_cpuinfo("") == {"model": "", "features": ""}


def test_cpu_info_reads_the_file(monkeypatch, tmp_path) -> None:
    for text, features in ((ZEN3, "avx2 fma f16c"), (VNNI, "avx2 fma f16c avx_vnni avx512f avx512_vnni"),
                           ("model name: x\n", "")):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(machine, "CPUINFO", tmp_path / "cpuinfo")
        machine.cpu_info.cache_clear()
        assert machine.cpu_info()["features"] == features and machine.cpu_info()["model"]
    machine.cpu_info.cache_clear()


def test_unreadable_cpuinfo_still_describes_the_machine(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    machine.cpu_info.cache_clear()
    try:
        info = machine.cpu_info()
        assert info["model"] and info["features"] == "" and "cores" in machine.cpu_summary()
    finally:
        machine.cpu_info.cache_clear()


def test_calibration_key_changes_with_the_cpu_features(monkeypatch) -> None:
    from casspec.scheduler import calibrate

    class Runner:  # what machine_key reads of a runner
        backend = type("B", (), {"name": "kernels"})()
        kernel_build = "k"

    keys = []
    for feats in ("avx2 fma f16c", "avx2 fma f16c avx_vnni"):
        monkeypatch.setattr(calibrate, "cpu_info", lambda f=feats: {"model": "AMD EPYC", "features": f})
        keys.append(calibrate.machine_key("smollm2", Runner()))  # type: ignore[arg-type]
    assert keys[0] != keys[1]


def test_calibration_interleaves_plans_and_small_query_sizes(monkeypatch) -> None:
    """A burst of machine noise must land on every plan and on every small query size, not on one plan's
    curve or one point of it."""
    from casspec.scheduler import calibrate
    from casspec.scheduler.latency import LatencyModel

    calls = []

    def fake_time_forward(runner, plan, q, ctx, repeats, argmax_only=False):
        calls.append((plan + "+argmax" * argmax_only, q, ctx))
        return 0.01 * q

    monkeypatch.setattr(calibrate, "time_forward", fake_time_forward)
    plans = {"full": "F", calibrate.GREEDY_VERIFY: "F", "a8": "A"}  # a greedy verify: the full plan, argmax only
    calibrate.calibrate(None, plans, LatencyModel(), max_query=24, ctx_lens=(64,))  # type: ignore[arg-type]
    assert [p for p, _, _ in calls] == ["F", "F+argmax", "A"] * (len(calls) // 3)
    small = [1, 2, 3, 4, 6, 8, 12, 16]  # the rows trees verify: SMALL_QUERY
    assert [q for p, q, _ in calls if p == "F"] == small * calibrate.ROUNDS + [24]
