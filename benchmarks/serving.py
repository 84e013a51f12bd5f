"""Serving under load: `casspec serve` batched vs one at a time, `ar` vs `casspec`, 1..16 streaming clients.

It starts one server per (method, max_batch), then runs `casspec loadtest` (closed loop, streaming chat,
greedy unless --temperature) against each in turn at each client count, and writes every report plus a
summary table and plot. With --rounds R each (server, client count) gets R slices of duration / R, the
servers' order rotated from round to round, so that a machine whose speed drifts over minutes cannot decide
a few-percent gap between methods: tok/s is the mean over the slices, latencies the median of their p50 / p95.

    python benchmarks/serving.py --out benchmarks/results/2026-11-29-serving --duration 40 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from casspec.runtime.machine import cpu_summary

BIN = Path(sys.executable).parent / "casspec"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, method: str, max_batch: int, port: int) -> subprocess.Popen:
    cmd = [str(BIN), "serve", "--method", method, "--max-batch", str(max_batch), "--max-queue", "64",
           "--port", str(port), "--log-level", "warning"] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:]) from None
            time.sleep(0.5)
    raise RuntimeError("server did not come up")


def loadtest(port: int, clients: int, duration: float, max_tokens: int, path: Path, temperature: float = 0.0) -> dict:
    cmd = [str(BIN), "loadtest", "--url", f"http://127.0.0.1:{port}", "--clients", str(clients), "--duration",
           str(duration), "--max-tokens", str(max_tokens), "--stream", "--temperature", str(temperature),
           "--json", str(path)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--methods", default="ar,casspec")
    ap.add_argument("--batches", default="16,1", help="max_batch values (1 = one at a time)")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of load per (server, client count)")
    ap.add_argument("--rounds", type=int, default=1, help="slices the duration is cut into, servers interleaved")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="the clients' sampling temperature (0: greedy)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [(m, int(b)) for b in args.batches.split(",") for m in args.methods.split(",")]
    servers: dict[tuple[str, int], tuple[subprocess.Popen, int]] = {}
    rows = []
    try:
        for method, max_batch in keys:
            port = free_port()
            servers[(method, max_batch)] = (start_server(args.model, method, max_batch, port), port)
        for clients in [int(c) for c in args.clients.split(",")]:
            reports: dict[tuple[str, int], list[dict]] = {k: [] for k in keys}
            for r in range(args.rounds):
                for method, max_batch in keys[r % len(keys):] + keys[:r % len(keys)]:
                    name = f"{method}-batch{max_batch}-c{clients}" + (f"-r{r}" if args.rounds > 1 else "")
                    reports[(method, max_batch)].append(loadtest(
                        servers[(method, max_batch)][1], clients, args.duration / args.rounds, args.max_tokens,
                        out / f"{name}.json", args.temperature))
            for (method, max_batch), reps in reports.items():
                rows.append({"method": method, "max_batch": max_batch, "clients": clients, **merged(reps)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for server, _ in servers.values():
            os.killpg(server.pid, signal.SIGINT)
            server.wait(30)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "cpu": cpu_summary(), "rows": rows}, indent=1))
    write_table(rows, out / "summary.md")
    plot(rows, out / "serving.png")


def merged(reps: list[dict]) -> dict:
    """One row from the slices of one (server, client count): counts summed, tok/s averaged over the equal
    slices (also listed per slice), every other figure the median over the slices."""
    rows = [summary(r) for r in reps]
    out: dict = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        if key in ("requests", "errors", "rejected_429"):
            out[key] = sum(values)
        elif key == "tok_s":
            out[key] = statistics.fmean(values) if values else None
        else:
            out[key] = statistics.median(values) if values else None
    if len(rows) > 1:
        out["tok_s_per_round"] = [r["tok_s"] for r in rows]
    return out


def summary(rep: dict) -> dict:
    """The figures the README quotes, from one loadtest report (see casspec/loadtest/stats.py)."""
    kinds = rep.get("errors_by_kind") or {}
    rejected = sum(v for k, v in kinds.items() if "429" in str(k))
    return {"requests": rep["ok"], "errors": rep["errors"] - rejected, "rejected_429": rejected,
            "tok_s": rep["tokens_per_s"], "latency_p50": rep["latency_s"].get("p50"),
            "latency_p95": rep["latency_s"].get("p95"), "ttft_p50": rep["ttft_s"].get("p50"),
            "ttft_p95": rep["ttft_s"].get("p95"), "itl_p50": rep["itl_s"].get("p50"),
            "mean_accepted_length": (rep.get("server") or {}).get("mean_accepted_length"),
            "planner_ms_per_step": (rep.get("planner") or {}).get("ms_per_step")}


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| method | max_batch | clients | requests | errors | 429 | tok/s | p50 latency s | p95 latency s | "
             "p50 TTFT s | p95 TTFT s | p50 ITL ms | planner ms/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, s=1.0, d=2: "-" if v is None else f"{v * s:.{d}f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['max_batch']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                     f"{r['rejected_429']} | {f(r['tok_s'], d=1)} | {f(r['latency_p50'])} | {f(r['latency_p95'])} | "
                     f"{f(r['ttft_p50'])} | {f(r['ttft_p95'])} | {f(r['itl_p50'], 1e3, 1)} | "
                     f"{f(r.get('planner_ms_per_step'), d=3)} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key in sorted({(r["method"], r["max_batch"]) for r in rows}):
        pts = [r for r in rows if (r["method"], r["max_batch"]) == key]
        label = f"{key[0]}, " + ("one at a time" if key[1] == 1 else f"batched (max {key[1]})")
        style = "-" if key[1] > 1 else "--"
        ax1.plot([r["clients"] for r in pts], [r["tok_s"] or 0 for r in pts], style, marker="o", label=label)
        ax2.plot([r["clients"] for r in pts], [r["ttft_p50"] or 0 for r in pts], style, marker="o", label=label)
    ax1.set(xlabel="concurrent streaming clients", ylabel="aggregate completion tok/s", title="throughput")
    ax2.set(xlabel="concurrent streaming clients", ylabel="p50 time to first token (s)", title="TTFT", yscale="log")
    ax1.legend(fontsize=8)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
