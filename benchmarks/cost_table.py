"""The cost table of a latency budget: pruned layouts of one model, built and timed on this machine.

Each layout (heads kept per layer, :func:`pipeline.budget.cost_layouts`) is cut from the same model
with ``prune_heads_`` and turned into the file the budget's engine runs: a checkpoint folder
(``torch-fp32``), the exported ONNX graph (``onnx-fp32``), or that graph quantized with the
``int8-dynamic`` preset (``onnx-int8``), from the plain or the fused graph as the quantize stage
would build it. All layouts are then timed with :func:`benchmarks.timing.interleaved`: each
measurement in a fresh process with its thread counts fixed before imports, rounds interleaved
(A B C A B C), one row per layout from its rounds (``bench.aggregate``). The weights do not
change the latency, so the pretrained model with a fresh classifier head stands in for the fine-tuned one.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from benchmarks.timing import STAT_KEYS, interleaved, machine_info

ENGINE_FILES = {"torch-fp32": "torch", "onnx-fp32": "onnxruntime", "onnx-int8": "onnxruntime"}
INT8_PRESET = "int8-dynamic"


def build_layout(model, layout, folder: Path, *, engine: str, opset: int = 18,
                 graph: str = "plain", blocks=None, block_size: int = 64) -> tuple[str, Path]:
    """Cut ``layout`` from a copy of ``model`` and write the file ``engine`` runs.

    Args:
        model: an unpruned classifier (left unchanged).
        layout: heads kept per layer.
        blocks, block_size: feed-forward blocks of ``block_size`` neurons kept per layer (the first
            ones; which does not change the latency); None keeps every neuron.
        folder: where the file goes (one name per layout is the caller's business).
        engine: ``torch-fp32``, ``onnx-fp32`` or ``onnx-int8``.
        opset: ONNX opset of the export.
        graph: ``plain``, or ``fused`` to build from onnxruntime's optimized graph.

    Returns:
        (timing engine, path): ``("torch", checkpoint folder)`` or ``("onnxruntime", .onnx file)``.
    """
    from pipeline.budget import kept_heads_for_layout
    from pipeline.surgery import prune_ffn_, prune_heads_, save_pruned

    if engine not in ENGINE_FILES:
        raise ValueError(f"engine: unknown {engine!r}; valid: {', '.join(ENGINE_FILES)}")
    pruned = prune_heads_(copy.deepcopy(model), kept_heads_for_layout(layout))
    if blocks is not None:
        prune_ffn_(pruned, {layer: list(range(n * block_size)) for layer, n in enumerate(blocks)})
    folder.mkdir(parents=True, exist_ok=True)
    if engine == "torch-fp32":
        return "torch", save_pruned(pruned, folder / "model")

    from exporters.onnx import export_onnx

    path = export_onnx(pruned, folder / "fp32.onnx", opset=opset)
    if graph == "fused":
        from exporters.optimize import optimize_onnx

        path = optimize_onnx(path, folder / "fp32-fused.onnx").path
    if engine == "onnx-int8":
        from exporters.quantize import quantize

        path = quantize(path, folder / "int8.onnx", INT8_PRESET)
    return "onnxruntime", path


def measure_cost_table(model, layouts: list[dict], *, engine: str, batch: int, seq: int, threads: int,
                       warmup: int, runs: int, rounds: int, min_seconds: float = 0.0,
                       aggregate: str = "best", opset: int = 18, graph: str = "plain",
                       block_size: int = 64, log=None) -> dict:
    """Build every layout of ``model`` and time them all, interleaved, each in a fresh process.

    Args:
        model: the unpruned classifier.
        layouts: from :func:`pipeline.budget.cost_layouts` (``name``, ``layout``, ``keep``, ``empty_layers``),
            or :func:`pipeline.budget.ffn_cost_layouts` (also ``blocks`` of ``block_size`` neurons per layer).
        engine: the budget's engine.
        batch, seq: the shape of one call.
        threads: intra-op threads of the engine (and OMP/MKL pools).
        warmup, runs, min_seconds: as for :func:`benchmarks.timing.time_callable`.
        rounds, aggregate: as for :func:`benchmarks.timing.interleaved`.
        opset, graph: how ONNX files are built (see :func:`build_layout`).
        log: called with a line per layout built, when given.

    Returns:
        ``{"points": [layout fields + p50_ms, p90_ms, p99_ms, mean_ms, throughput_per_s,
        rounds_p50_ms, spread, load_avg]}, "machine": machine_info() before timing}``.
    """
    with tempfile.TemporaryDirectory(prefix="dsprune-costs-") as work:
        specs = []
        for item in layouts:
            timing_engine, path = build_layout(model, item["layout"], Path(work) / item["name"], engine=engine,
                                               opset=opset, graph=graph, blocks=item.get("blocks"),
                                               block_size=block_size)
            specs.append({"engine": timing_engine, "model": str(path), "batch": batch, "seq": seq,
                          "warmup": warmup, "runs": runs, "min_seconds": min_seconds})
            if log:
                blocks = f", {sum(item['blocks'])} blocks" if item.get("blocks") is not None else ""
                log(f"  built {item['name']}: {sum(item['layout'])} heads{blocks}, "
                    f"{item['empty_layers']} empty layer(s)")
        machine = machine_info()
        results = interleaved(specs, threads=threads, rounds=rounds, aggregate=aggregate)
    points = []
    for item, result in zip(layouts, results):
        points.append({**item, **{k: result[k] for k in STAT_KEYS},
                       "rounds_p50_ms": result["rounds_p50_ms"], "spread": result["spread"],
                       "aggregate": result["aggregate"], "rounds": result["rounds"],
                       "confirmed_rounds": result["confirmed_rounds"],
                       "load_avg": result["load_avg"]})
    return {"points": points, "machine": machine}
