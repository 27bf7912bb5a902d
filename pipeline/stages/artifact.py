"""Stage artifact: the deployable folder of the pruned model (exporters.artifact).

The pruned CPU variants from the quantize stage are timed, each in its own process, interleaved
(bench's threads, warm-up, runs and rounds, at the smallest bench batch and the first bench sequence
length); ``model.onnx`` is the fastest among those within ``quantize.max_drop`` (all of them when
unset; the quantize stage already failed on a crossing). Every pruned variant sits beside it; the
latency summary also carries the bench rows of the same file when bench timed it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from exporters.artifact import TaskInfo, Variant, build_artifact, sha256_file
from pipeline.config import RunConfig
from pipeline.evaluation import task_spec
from pipeline.run import versions
from pipeline.stages.bench import variant_files

LATENCY_KEYS = ("batch", "seq", "threads", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "spread", "load_avg")


def time_variants(files: dict[str, Path], cfg: RunConfig) -> dict[str, dict]:
    """{name: latency summary} of ONNX files, each timed in a fresh process, interleaved."""
    from benchmarks.timing import interleaved

    b = cfg.bench
    names = list(files)
    specs = [{"engine": "onnxruntime", "model": str(files[n]), "batch": min(b.batches), "seq": b.seqs[0],
              "warmup": b.warmup, "runs": b.runs, "min_seconds": b.min_seconds} for n in names]
    results = interleaved(specs, threads=b.threads, rounds=b.rounds, aggregate=b.aggregate)
    keys = ("p50_ms", "p90_ms", "p99_ms", "batch", "seq", "threads", "aggregate", "rounds_p50_ms", "median_p50_ms",
            "confirmed_rounds", "spread", "load_avg")
    return {n: {k: r[k] for k in keys if k in r} for n, r in zip(names, results)}


def choose(variants: dict[str, dict], max_drop: float | None) -> tuple[str, str]:
    """(file name, reason) of the fastest timed pruned CPU variant within ``max_drop``."""
    candidates = {name: v for name, v in variants.items()
                  if v["model"] == "pruned" and v["device"] == "cpu" and v.get("latency")
                  and (max_drop is None or v["drop"] <= max_drop)}
    if not candidates:
        name = next(n for n, v in variants.items() if v["model"] == "pruned" and v["preset"] is None)
        return name, "no variant was timed; the fp32 model"
    name = min(candidates, key=lambda n: candidates[n]["latency"]["p50_ms"])
    latency = candidates[name]["latency"]
    bound = f"within quantize.max_drop {max_drop:g}" if max_drop is not None else "no accuracy bound set"
    return name, (f"the fastest pruned CPU variant ({bound}): p50 {latency['p50_ms']:.2f} ms at batch "
                  f"{latency['batch']}, seq {latency['seq']}, {latency['threads']} threads, of "
                  + ", ".join(f"{n} {v['latency']['p50_ms']:.2f}" for n, v in sorted(candidates.items())))


def bench_latency(cfg: RunConfig, run_dir: Path, chosen: Path) -> dict | None:
    """The bench rows (and machine) of the variant whose timed file had the same bytes as ``chosen``.

    The bytes bench timed are the input hashes the run's manifest recorded for the bench stage, so
    rows measured on an older file never describe a newer one.
    """
    rows_path = run_dir / "bench" / "rows.jsonl"
    record = json.loads((run_dir / "manifest.json").read_text())["stages"].get("bench", {})
    if not rows_path.is_file() or not record:
        return None
    digest = sha256_file(chosen)
    same = [name for name, (_, path) in variant_files(cfg, run_dir).items()
            if record["inputs"].get(Path(path).relative_to(run_dir).as_posix()) == digest]
    if not same:
        return None
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    machine_path = run_dir / "bench" / "machine.json"
    machine = json.loads(machine_path.read_text()) if machine_path.is_file() else {}
    return {"variant": same[0], "source": "bench/rows.jsonl",
            "rows": [{k: r[k] for k in LATENCY_KEYS if k in r} for r in rows if r["variant"] == same[0]],
            "machine": {k: machine.get(k) for k in ("cpu", "cores", "usable_cores", "load_avg", "platform")}}


def run(cfg: RunConfig, run_dir, out):
    run_dir, out = Path(run_dir), Path(out)
    quant = json.loads((run_dir / "quantize" / "metrics.json").read_text())
    finetune = json.loads((run_dir / "finetune" / "metrics.json").read_text())
    # quantize/pruned-int8-dynamic.onnx -> artifact/model-int8-dynamic.onnx
    pruned = {name.replace("pruned-", "model-", 1): (name, v) for name, v in quant["variants"].items()
              if v["model"] == "pruned"}
    timings = time_variants({file: run_dir / "quantize" / name for file, (name, v) in pruned.items()
                             if v["device"] == "cpu"}, cfg)
    measured = {file: {**v, "latency": timings.get(file)} for file, (_, v) in pruned.items()}
    chosen, why = choose(measured, cfg.quantize.max_drop)
    variants = [
        Variant(source=run_dir / "quantize" / name, file=file,
                precision=v["precision"], preset=v["preset"], graph=v["graph"], device=v["device"],
                metric=v["metric"], drop=v["drop"], fused_ops=v["fused_ops"], latency=timings.get(file))
        for file, (name, v) in pruned.items()
    ]
    task = task_spec(cfg)
    info = TaskInfo(name=task.name, metric=quant["metric"], label_names=task.label_names,
                    text_segments=len(task.text_columns), max_length=cfg.data.max_seq_length,
                    eval_examples=finetune["eval_examples"])
    config = json.loads((run_dir / "config.json").read_text())
    manifest = build_artifact(
        out, variants, chosen=chosen, checkpoint=run_dir / "prune" / "model",
        task=info, why_chosen=why, latency=bench_latency(cfg, run_dir, run_dir / "quantize" / pruned[chosen][0]),
        made_by={"tool": "dsprune", "model": config["model"]["name"], "seed": cfg.seed,
                 "config_sha256": hashlib.sha256(json.dumps({k: v for k, v in config.items() if k != "run_dir"},
                                                             sort_keys=True).encode()).hexdigest(),
                 "versions": versions()},
    )
    return {"model": manifest["chosen"]["file"], "files": len(manifest["files"])}
