"""CPU latency of plain against fused graphs (onnxruntime's transformer optimizer), fp32 and int8-dynamic,
under onnxruntime's default session settings and under dsprune's (``exporters.onnx.CPU_SESSION_CONFIG``).

    python -m benchmarks.graph_optimization --model runs/sst2-minilm/prune/model \\
        --model runs/sst2-minilm/finetune/baseline --out benchmarks/results

Each checkpoint is exported (eager-traced, as the export stage does), fused with
``exporters.optimize.optimize_onnx`` (logits checked against the plain graph), and both graphs are
quantized with ``int8-dynamic``. Every (model, precision, graph, session, batch) is timed with onnxruntime in
its own process with fixed thread counts, all interleaved over ``--rounds`` rounds; medians over
rounds are reported. Writes ``graph-optimization-cpu.jsonl`` (flat rows) and
``graph-optimization-cpu.md`` (built from the rows) to ``--out``. The quantize stage's choice of
graph per precision (``quantize.optimize: auto``) and the session config of every CPU session are the
ones these numbers support.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

JSONL_NAME = "graph-optimization-cpu.jsonl"
MARKDOWN_NAME = "graph-optimization-cpu.md"
PRECISIONS = ("fp32", "int8-dynamic")
GRAPHS = ("plain", "fused")
# Session config entries per name: None is dsprune's CPU_SESSION_CONFIG, {} onnxruntime's defaults.
SESSIONS = {"ort-default": {}, "dsprune": None}


def build(checkpoint: Path, work: Path) -> tuple[dict[tuple[str, str], Path], dict]:
    """Plain and fused graphs of one checkpoint, fp32 and int8-dynamic, and the fused-op counts."""
    import numpy as np

    from exporters.onnx import default_example, export_onnx, onnx_session, predict_onnx
    from exporters.optimize import fused_op_counts, optimize_onnx
    from exporters.quantize import quantize
    from pipeline.surgery import load_pruned

    model = load_pruned(checkpoint)
    work.mkdir(parents=True, exist_ok=True)
    files = {("fp32", "plain"): export_onnx(model, work / "fp32-plain.onnx")}
    files["fp32", "fused"] = optimize_onnx(files["fp32", "plain"], work / "fp32-fused.onnx").path
    batch = default_example(batch=4, seq=37)
    batch["attention_mask"][1, 20:] = 0
    diff = float(np.abs(predict_onnx(onnx_session(files["fp32", "fused"]), [batch])
                        - predict_onnx(onnx_session(files["fp32", "plain"]), [batch])).max())
    for graph in GRAPHS:
        files["int8-dynamic", graph] = quantize(files["fp32", graph], work / f"int8-dynamic-{graph}.onnx")
    info = {"fused_parity_max_abs_diff": diff,
            "fused_ops": {f"{p}-{g}": fused_op_counts(path) for (p, g), path in files.items()},
            "kept_heads": getattr(model.config, "dsprune_kept_heads", None)}
    return files, info


@click.command()
@click.option("--model", "models", multiple=True, required=True, type=click.Path(file_okay=False),
              help="A checkpoint folder (save_pruned layout); repeatable.")
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False))
@click.option("--work", default="runs/graph-optimization", show_default=True, type=click.Path(file_okay=False))
@click.option("--batches", default="1,16", show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--runs", default=20, show_default=True)
@click.option("--rounds", default=3, show_default=True)
def main(models, out, work, batches, seq, threads, warmup, runs, rounds):
    """Time plain against fused graphs and write the rows and a Markdown table."""
    from benchmarks.timing import interleaved, machine_info

    out, work = Path(out), Path(work)
    built = {}
    for checkpoint in map(Path, models):
        name = f"{checkpoint.parent.name}/{checkpoint.name}"
        files, info = build(checkpoint, work / checkpoint.parent.name / checkpoint.name)
        built[name] = (files, info)
        click.echo(f"{name}: fused {info['fused_ops']['fp32-fused']}, parity {info['fused_parity_max_abs_diff']:.2g}",
                   err=True)
    machine = machine_info()
    rows = []
    for batch in (int(b) for b in batches.split(",")):
        keys = [(name, p, g, c) for name in built for p in PRECISIONS for g in GRAPHS for c in SESSIONS]
        specs = [{"engine": "onnxruntime", "model": str(built[name][0][p, g]), "batch": batch, "seq": seq,
                  "warmup": warmup, "runs": runs, "session_config": SESSIONS[c]} for name, p, g, c in keys]
        results = interleaved(specs, threads=threads, rounds=rounds, aggregate="median")
        for (name, precision, graph, session), result in zip(keys, results):
            rows.append({"model": name, "precision": precision, "graph": graph, "session": session,
                         "engine": "onnxruntime", "device": "cpu", "threads": threads, "batch": batch, "seq": seq,
                         "fused_ops": built[name][1]["fused_ops"][f"{precision}-{graph}"],
                         **{k: result[k] for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "rounds_p50_ms",
                                                    "spread", "load_avg")}})
            click.echo(f"{name} {precision} {graph} {session} batch {batch}: p50 {result['p50_ms']:.2f} ms", err=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / JSONL_NAME, "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "machine": machine}, sort_keys=True) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(rows, built, machine, " ".join(shlex.quote(a) for a in sys.argv[1:])))
    click.echo(f"wrote {out / JSONL_NAME} and {out / MARKDOWN_NAME}", err=True)


def markdown(rows: list[dict], built: dict, machine: dict, argv: str) -> str:
    """The Markdown report, built from the rows."""
    from exporters.onnx import CPU_SESSION_CONFIG

    by_key = {(r["model"], r["precision"], r["graph"], r["session"], r["batch"]): r for r in rows}
    loads = [r["load_avg"][0] for r in rows]
    lines = [
        "# Plain against fused ONNX graphs on CPU, under onnxruntime's and dsprune's session settings",
        "",
        f"`python -m benchmarks.graph_optimization {argv}`",
        "",
        f"{machine['cpu']}, {machine['usable_cores']} usable cores; onnxruntime {machine['versions']['onnxruntime']}, "
        f"{rows[0]['threads']} intra-op threads, seq {rows[0]['seq']}. Each configuration in its own process, "
        f"interleaved, {len(rows[0]['rounds_p50_ms'])} rounds; p50 is the median over rounds. 1-minute load average "
        f"during the rounds: {min(loads):.2f} to {max(loads):.2f} on {machine['usable_cores']} cores.",
        "",
        "Sessions: `ort-default` is onnxruntime's defaults (all graph optimizations); `dsprune` adds the config "
        "entries of `exporters.onnx.CPU_SESSION_CONFIG`: " + ", ".join(
            f"`{k}={v}`" for k, v in CPU_SESSION_CONFIG.items()) + ".",
        "",
        "| model | precision | batch | plain, ort-default | plain, dsprune | dsprune / ort-default | "
        "fused, ort-default | fused, dsprune | fused / plain (dsprune) | fused ops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, precision, batch in sorted({(m, p, b) for m, p, _, _, b in by_key}):
        cell = {(g, c): by_key[model, precision, g, c, batch]["p50_ms"] for g in GRAPHS for c in SESSIONS}
        ops = ", ".join(f"{k} {v}" for k, v in by_key[model, precision, "fused", "dsprune", batch]["fused_ops"].items())
        lines.append(
            f"| {model} | {precision} | {batch} | {cell['plain', 'ort-default']:.2f} | "
            f"{cell['plain', 'dsprune']:.2f} | "
            f"{cell['plain', 'dsprune'] / cell['plain', 'ort-default']:.2f} | {cell['fused', 'ort-default']:.2f} | "
            f"{cell['fused', 'dsprune']:.2f} | {cell['fused', 'dsprune'] / cell['plain', 'dsprune']:.2f} | {ops} |")
    lines += ["", "Fused logits against plain (max abs diff): " + ", ".join(
        f"{name} {info['fused_parity_max_abs_diff']:.2g}" for name, (_, info) in built.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
