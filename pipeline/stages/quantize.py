"""Stage quantize: the fp32 graph to ship and every configured preset, of the baseline and pruned models.

Each precision is built from the plain exported graph or from the graph fused by onnxruntime's
transformer optimizer (exporters.optimize; its logits are checked against the plain graph's).
``quantize.optimize: auto`` takes each precision's recorded choice: fused only where
benchmarks/graph_optimization.py measured it faster (on 2 CPU threads it was not, for fp32 or
int8), and for fp16, a GPU preset, where the fused attention kernels are the point. ``always``
fuses wherever a preset can (int8-static cannot: the fused ops have no QDQ form), ``never``
nowhere. The choice is fixed rather than timed here so that a rerun gives the same bytes.

Outputs: ``{model}-fp32.onnx`` and ``{model}-{preset}.onnx`` per preset, with ``metrics.json``:
dev metric, drop against the model's fp32 ONNX, size and fused-op counts of every variant. A preset
whose pruned variant loses more than ``quantize.max_drop`` fails the stage (exit 1), naming it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from exporters.onnx import ParityError, onnx_session, predict_onnx
from exporters.optimize import fused_op_counts, optimize_onnx
from exporters.quantize import PRESETS, quantize
from pipeline import data
from pipeline.config import RunConfig
from pipeline.evaluation import load_task_data, score
from pipeline.models import load_tokenizer
from pipeline.progress import progress_bar
from pipeline.run import GateFailed, write_json_atomic

MODELS = ("baseline", "pruned")
CALIBRATION_BATCH = 16
# fp32 ships the plain graph under optimize: auto: the fused one ran 9.35 vs 8.84 ms at batch 1 and
# 145 vs 152 ms at batch 16, inside that row's noise (plain's rounds 146-155 ms) (heads+FFN-pruned
# MiniLM, seq 128, 2 threads; benchmarks/results/graph-optimization-cpu.md).
FP32_GRAPH = "plain"


def graph_for(precision: str, optimize: str) -> str:
    """The graph ("plain" or "fused") a precision (``fp32`` or a preset name) is built from."""
    can_fuse = precision == "fp32" or PRESETS[precision].fused_graph
    if optimize == "never" or not can_fuse:
        return "plain"
    if optimize == "always":
        return "fused"
    return FP32_GRAPH if precision == "fp32" else PRESETS[precision].graph


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs no disk; the export stage replaces its files (new inodes), never rewrites them.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _check_fused(fused: Path, plain: Path, batch, atol: float) -> float:
    got = predict_onnx(onnx_session(fused), [batch])
    expected = predict_onnx(onnx_session(plain), [batch])
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:
        raise ParityError(f"{fused}: fused graph differs from {plain} by {diff:.3g} on the logits "
                          f"(export.parity_atol {atol:g})")
    return diff


def check_max_drop(variants: dict, metric: str, max_drop: float | None) -> None:
    """Raise GateFailed naming every preset whose pruned variant drops more than ``max_drop``."""
    if max_drop is None:
        return
    failed = [v for v in variants.values() if v["model"] == "pruned" and v["preset"] and v["drop"] > max_drop]
    if failed:
        raise GateFailed("quantize.max_drop {:g} crossed: {}".format(max_drop, "; ".join(
            f"preset {v['preset']} loses {v['drop']:.4f} {metric} ({v['metric'][metric]:.4f} vs fp32 "
            f"{v['metric'][metric] + v['drop']:.4f})" for v in failed)))


def run(cfg: RunConfig, run_dir, out):
    q = cfg.quantize
    unknown = [p for p in q.presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"quantize.presets: unknown {unknown}; valid: {', '.join(PRESETS)}")
    run_dir, out = Path(run_dir), Path(out)
    task_data = load_task_data(cfg, load_tokenizer(cfg.model))
    metric = task_data.task.primary_metric
    dev_batches = list(task_data.dev_batches())
    calibration = None
    if any(PRESETS[p].method == "static" for p in q.presets):
        examples = data.read_task(Path(cfg.data.train), task_data.task, q.calibration_examples)
        encoded = data.encode(task_data.tokenizer, examples, cfg.data.max_seq_length)
        calibration = list(data.batches(encoded, CALIBRATION_BATCH, shuffle=False))

    graphs = {p: graph_for(p, q.optimize) for p in ("fp32", *q.presets)}
    scratch = out / ".fused"
    variants: dict[str, dict] = {}
    fused: dict[str, dict] = {}
    # One tick per (model, precision): quantizing and scoring each on the dev set takes seconds each.
    with progress_bar(len(MODELS) * len(graphs), "quantize") as bar:
        for model in MODELS:
            sources = {"plain": run_dir / "export" / f"{model}.onnx"}
            if "fused" in graphs.values():
                result = optimize_onnx(sources["plain"], scratch / f"{model}.onnx")
                sources["fused"] = result.path
                fused[model] = {"fused_ops": result.fused, "explicit_head_counts": result.explicit_head_counts,
                                "parity_max_abs_diff": _check_fused(result.path, sources["plain"], dev_batches[0],
                                                                    cfg.export.parity_atol)}
            for precision, graph in graphs.items():
                bar.set_postfix_str(f"{model} {precision}")  # the one in progress
                path = out / f"{model}-{precision}.onnx"
                if precision == "fp32":
                    _link_or_copy(sources[graph], path)
                else:
                    quantize(sources[graph], path, precision, calibration=calibration)
                logits = predict_onnx(onnx_session(path, threads=cfg.threads), dev_batches)
                variants[path.name] = {
                    "model": model, "preset": None if precision == "fp32" else precision,
                    "precision": "fp32" if precision == "fp32" else PRESETS[precision].precision,
                    "device": "gpu" if precision != "fp32" and PRESETS[precision].gpu else "cpu",
                    "graph": graph, "fused_ops": fused_op_counts(path), "bytes": path.stat().st_size,
                    "metric": score(task_data.task, logits, task_data.dev.labels),
                }
                bar.update(1)
            reference = variants[f"{model}-fp32.onnx"]
            for precision in graphs:
                v = variants[f"{model}-{precision}.onnx"]
                v["drop"] = reference["metric"][metric] - v["metric"][metric]
                v["size_ratio"] = reference["bytes"] / v["bytes"]
    shutil.rmtree(scratch, ignore_errors=True)

    write_json_atomic(out / "metrics.json", {
        "metric": metric,
        "max_drop": q.max_drop,
        "optimize": q.optimize,
        "graphs": graphs,
        # {preset: {model: metrics}}: the shape the report reads.
        "metrics": {p: {m: variants[f"{m}-{p}.onnx"]["metric"] for m in MODELS} for p in q.presets},
        "variants": variants,
        "fused": fused,
        "file_bytes": {name: v["bytes"] for name, v in variants.items()},
    })
    check_max_drop(variants, metric, q.max_drop)
    return {"presets": list(q.presets), "graphs": graphs,
            "drops": {v["preset"] or "fp32": round(v["drop"], 6) for v in variants.values() if v["model"] == "pruned"}}
