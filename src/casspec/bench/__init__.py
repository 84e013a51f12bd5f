"""Spec-Bench race of every decoding method side by side (`casspec bench`), and the
verification cost profile (`casspec profile`).

    from casspec.bench.prompts import load_questions
    from casspec.bench.runner import BenchConfig, run_model
    from casspec.bench.report import write_reports
    records = run_model(engine, load_questions(limit=1), BenchConfig(max_new_tokens=32))
    summary = write_reports(records, "bench_out/run1")

Modules: prompts (question.jsonl), runner (the race), peers (HF generate peers), compare
(greedy losslessness + logit gaps), report (speedups, files), render (report.md, rich table),
plots (PNGs), profile (forward cost vs query tokens), cli (argparse subcommands).
Kept import-light: nothing heavy is imported until a subcommand runs.
"""
