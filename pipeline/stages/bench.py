"""Stage bench: CPU latency of every variant, each configuration in its own process, interleaved.

With a ``budget`` set, its engine and its (batch, seq) are timed too, whatever ``bench`` lists, so
the report stage can check the measured latency against the budget.

Writes flat rows (variant, engine, precision, device, threads, batch, seq, p50/p90/p99, throughput)
to ``rows.jsonl`` and the machine description to ``machine.json``.
"""
from __future__ import annotations

import json

from benchmarks.timing import interleaved, machine_info
from pipeline.config import RunConfig
from pipeline.models import resolve_model_path
from pipeline.progress import progress_bar
from pipeline.run import write_json_atomic


def variant_files(cfg: RunConfig, run_dir) -> dict[str, tuple[str, str]]:
    """{variant name: (engine, path)} for the engines the bench config asks for."""
    files = {
        "torch-fp32": {"baseline": run_dir / "finetune" / "baseline", "pruned": run_dir / "prune" / "model"},
        "onnx-fp32": {"baseline": run_dir / "export" / "baseline.onnx", "pruned": run_dir / "export" / "pruned.onnx"},
        "onnx-int8": {n: run_dir / "quantize" / f"{n}-int8-dynamic.onnx" for n in ("baseline", "pruned")},
    }
    out = {}
    for engine in dict.fromkeys((*cfg.bench.engines, *budget_engines(cfg))):
        if engine not in files:
            raise ValueError(f"bench.engines: unknown {engine!r}; valid: {', '.join(files)}")
        for model, path in files[engine].items():
            out[f"{model}/{engine}"] = ("torch" if engine.startswith("torch") else "onnxruntime", str(path))
    return out


def budget_engines(cfg: RunConfig) -> tuple[str, ...]:
    """The budget's engine, timed whatever ``bench.engines`` lists, so the budget can be checked."""
    return (cfg.budget.engine,) if cfg.budget.active else ()


def shapes(cfg: RunConfig) -> list[tuple[int, int]]:
    """(batch, seq) pairs to time: the bench grid, plus the budget's shape when a budget is set."""
    grid = [(batch, seq) for seq in cfg.bench.seqs for batch in cfg.bench.batches]
    if cfg.budget.active and (cfg.budget.batch, cfg.budget.seq) not in grid:
        grid.append((cfg.budget.batch, cfg.budget.seq))
    return grid


def run(cfg: RunConfig, run_dir, out):
    b = cfg.bench
    variants = variant_files(cfg, run_dir)
    tokenizer = resolve_model_path(cfg.model)
    rows = []
    grid = shapes(cfg)

    def tick(spec: dict) -> None:
        bar.set_postfix_str(f"{spec['variant']} batch {spec['batch']} seq {spec['seq']}", refresh=False)
        bar.update(1)

    # One tick per measurement (a fresh process each): variants x grid x rounds.
    with progress_bar(len(variants) * len(grid) * b.rounds, "bench") as bar:
        for batch, seq in grid:
            specs = [
                {"variant": name, "engine": engine, "model": path, "tokenizer": tokenizer,
                 "batch": batch, "seq": seq, "threads": b.threads, "warmup": b.warmup, "runs": b.runs,
                 "min_seconds": b.min_seconds}
                for name, (engine, path) in variants.items()
            ]
            measured = interleaved(specs, threads=b.threads, rounds=b.rounds, aggregate=b.aggregate, on_measured=tick)
            for spec, result in zip(specs, measured):
                model, _, kind = spec["variant"].partition("/")
                rows.append({
                    "variant": spec["variant"], "pruned": model == "pruned", "engine": spec["engine"],
                    "precision": kind.split("-")[1], "device": "cpu", "threads": b.threads,
                    "batch": batch, "seq": seq, **{k: result[k] for k in result if k not in spec},
                })
    with open(out / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    write_json_atomic(out / "machine.json", machine_info())
    return {"rows": len(rows)}
