"""GPU latency of the unpruned and a pruned model: torch fp16/bf16 with SDPA, eager and CUDA graphs.

    python -m benchmarks.gpu_latency --model .gpu-bundle/model --kept-heads MASK.json --out DIR

Each (variant, dtype, mode) runs in a fresh process that times every batch size; baseline and
pruned processes alternate over ``--rounds`` rounds and the medians over rounds are reported.
Timing uses CUDA events after warm-up; CUDA graphs replay one captured forward per batch size.
Writes ``gpu-latency.jsonl`` (flat rows) and ``gpu-latency.md`` to ``--out``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import click

BATCHES = (1, 8, 32, 128, 256)


def _child(spec: dict) -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.surgery import count_parameters, flops_per_token, prune_heads_

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(spec["model"])
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], config=config, dtype=torch.float32, attn_implementation="sdpa")
    if spec["variant"] == "pruned":
        prune_heads_(model, {int(k): v for k, v in spec["kept_heads"].items()})
    params, flops = count_parameters(model), flops_per_token(model, spec["seq"])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    model = model.to("cuda", dtype).eval()
    rows = []
    for batch in spec["batches"]:
        g = torch.Generator(device="cuda").manual_seed(batch)
        ids = torch.randint(1000, 2000, (batch, spec["seq"]), device="cuda", generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

        with torch.inference_mode():
            if spec["mode"] == "cudagraph":
                static = {k: v.clone() for k, v in inputs.items()}
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        model(**static)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(**static)

                def call():
                    graph.replay()
            else:
                def call():
                    model(**inputs)

            for _ in range(10):
                call()
            torch.cuda.synchronize()
            times = []
            for _ in range(spec["runs"]):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        times.sort()
        p50 = statistics.median(times)
        rows.append({
            "variant": f"{spec['variant']}/torch-{spec['dtype']}-{spec['mode']}", "pruned": spec["variant"] == "pruned",
            "engine": "torch", "precision": spec["dtype"], "mode": spec["mode"], "device": "cuda",
            "batch": batch, "seq": spec["seq"], "p50_ms": p50, "p90_ms": times[int(0.9 * (len(times) - 1))],
            "p99_ms": times[int(0.99 * (len(times) - 1))], "throughput_per_s": batch * 1000.0 / p50,
            "params": params, "flops_per_token": flops, "gpu": torch.cuda.get_device_name(),
        })
    return rows


@click.command()
@click.option("--model", type=click.Path(file_okay=False), required=True)
@click.option("--kept-heads", type=click.Path(dir_okay=False), required=True,
              help="JSON with {'kept_heads': {layer: [heads]}} (a run's harden/mask.json).")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--runs", default=100, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--child", hidden=True, is_flag=True)
def main(model, kept_heads, out, seq, runs, rounds, child):
    if child:
        print(json.dumps(_child(json.loads(sys.stdin.read()))))
        return
    import torch

    kept = json.loads(Path(kept_heads).read_text())["kept_heads"]
    results: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for dtype in ("fp16", "bf16"):
            for mode in ("eager", "cudagraph"):
                for variant in ("baseline", "pruned"):  # alternate A/B inside every round
                    spec = {"model": model, "kept_heads": kept, "variant": variant, "dtype": dtype, "mode": mode,
                            "batches": list(BATCHES), "seq": seq, "runs": runs}
                    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_latency", "--model", model,
                                           "--kept-heads", kept_heads, "--out", out, "--child"],
                                          input=json.dumps(spec), capture_output=True, text=True, check=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"})
                    for row in json.loads(proc.stdout.strip().splitlines()[-1]):
                        results.setdefault((row["variant"], row["batch"]), []).append(row)
    rows = []
    for (_, _), measured in results.items():
        row = dict(measured[0])
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            row[key] = statistics.median(m[key] for m in measured)
        row["throughput_per_s"] = row["batch"] * 1000.0 / row["p50_ms"]
        row["spread"] = max(m["p50_ms"] for m in measured) / min(m["p50_ms"] for m in measured)
        row["rounds"] = len(measured)
        row["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
        rows.append(row)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu-latency.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    (out / "gpu-latency.md").write_text(markdown(rows))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    by_key = {(r["variant"], r["batch"]): r for r in rows}
    lines = [f"# GPU latency: {rows[0]['gpu']}, seq {rows[0]['seq']}, torch {rows[0]['versions']['torch']}", "",
             "p50 ms per batch (median over rounds; CUDA events); speedup = baseline p50 / pruned p50; "
             "ideal = FLOP ratio.", "",
             "| dtype | mode | batch | baseline p50 ms | pruned p50 ms | speedup | ideal | pruned seq/s | spread |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype in ("fp16", "bf16"):
        for mode in ("eager", "cudagraph"):
            for batch in BATCHES:
                base = by_key.get((f"baseline/torch-{dtype}-{mode}", batch))
                pruned = by_key.get((f"pruned/torch-{dtype}-{mode}", batch))
                if not base or not pruned:
                    continue
                lines.append(
                    f"| {dtype} | {mode} | {batch} | {base['p50_ms']:.3f} | {pruned['p50_ms']:.3f} | "
                    f"{base['p50_ms'] / pruned['p50_ms']:.2f}x | {base['flops_per_token'] / pruned['flops_per_token']:.2f}x | "
                    f"{pruned['throughput_per_s']:.0f} | {max(base['spread'], pruned['spread']):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
