"""GPU latency of the unpruned and a pruned model: torch fp16/bf16 with SDPA; eager, CUDA graphs, torch.compile.

    python -m benchmarks.gpu_latency --model .gpu-bundle/model --kept-heads MASK.json --out DIR
    python -m benchmarks.gpu_latency ... --mode compile          # torch.compile rows only

Each (variant, dtype, mode) runs in a fresh process that times every batch size; baseline and
pruned processes alternate over ``--rounds`` rounds and the medians over rounds are reported.
Timing uses CUDA events after warm-up; CUDA graphs replay one captured forward per batch size.

``--mode compile`` (off by default: compiling costs minutes) times ``torch.compile`` with
``--compile-mode reduce-overhead``: Inductor's fused kernels replayed as CUDA graphs. Eager is
launch-bound here (about 4.5 ms at any batch on an H100), so a compile mode without graphs would
mostly time launches again; with graphs on both sides, compile against cudagraph isolates what
fusion adds, and it compiles far faster than the max-autotune modes, which fits the lent
machines' 10-minute commands. Shapes are static (``dynamic=False``): one compilation per batch
size, timed as the first call and reported as ``compile_s``, apart from the latency; the warm-up
calls after it absorb CUDA-graph recording, and a recompilation while timing is an error.

Writes ``gpu-latency.jsonl`` (flat rows) and ``gpu-latency.md`` to ``--out``. ``--device cpu``
only checks the code paths (eager and compile) on a machine without a GPU.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

BATCHES = (1, 8, 32, 128, 256)
MODES = ("eager", "cudagraph", "compile")
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune", "default")
WARMUP = 10


def _child(spec: dict) -> list[dict]:
    """Time one (variant, dtype, mode) at every batch size of ``spec``; one row per batch size.

    ``spec["compile_backend"]`` (default "inductor") lets the tests trace with Dynamo alone
    ("eager"), which checks this code path in seconds instead of the minutes Inductor takes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.surgery import count_parameters, flops_per_token, prune_heads_

    device = spec.get("device", "cuda")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(spec["model"])
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], config=config, dtype=torch.float32, attn_implementation="sdpa")
    if spec["variant"] == "pruned":
        prune_heads_(model, {int(k): v for k, v in spec["kept_heads"].items()})
    params, flops = count_parameters(model), flops_per_token(model, spec["seq"])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    model = model.to(device, dtype).eval()
    forward = model
    if spec["mode"] == "compile":
        forward = torch.compile(model, mode=spec["compile_mode"], dynamic=False,
                                backend=spec.get("compile_backend", "inductor"))
    rows = []
    for batch in spec["batches"]:
        g = torch.Generator(device=device).manual_seed(batch)
        ids = torch.randint(1000, 2000, (batch, spec["seq"]), device=device, generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        compile_s = None

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
            elif spec["mode"] == "compile":
                def call():
                    # reduce-overhead replays CUDA graphs whose outputs the next replay overwrites;
                    # this tells it that the previous outputs are no longer read.
                    torch.compiler.cudagraph_mark_step_begin()
                    forward(**inputs)

                start = time.perf_counter()
                call()  # compiles for this batch size
                _synchronize(device)
                compile_s = time.perf_counter() - start
            else:
                def call():
                    model(**inputs)

            for _ in range(WARMUP):
                call()
            _synchronize(device)
            if spec["mode"] == "compile":
                with torch._dynamo.config.patch(error_on_recompile=True):
                    times = _time_calls(call, spec["runs"], device)
            else:
                times = _time_calls(call, spec["runs"], device)
        times.sort()
        p50 = statistics.median(times)
        rows.append({
            "variant": f"{spec['variant']}/torch-{spec['dtype']}-{spec['mode']}", "pruned": spec["variant"] == "pruned",
            "engine": "torch", "precision": spec["dtype"], "mode": spec["mode"], "device": device,
            "batch": batch, "seq": spec["seq"], "p50_ms": p50, "p90_ms": times[int(0.9 * (len(times) - 1))],
            "p99_ms": times[int(0.99 * (len(times) - 1))], "throughput_per_s": batch * 1000.0 / p50,
            "params": params, "flops_per_token": flops,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            **({"compile_mode": spec["compile_mode"], "compile_s": compile_s} if spec["mode"] == "compile" else {}),
        })
    return rows


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_calls(call, runs: int, device: str) -> list[float]:
    """Milliseconds of ``runs`` calls: CUDA events on a GPU, the wall clock on a CPU."""
    import torch

    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000.0)
    return times


@click.command()
@click.option("--model", type=click.Path(file_okay=False), required=True)
@click.option("--kept-heads", type=click.Path(dir_okay=False), required=True,
              help="JSON with {'kept_heads': {layer: [heads]}} (a run's harden/mask.json).")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--runs", default=100, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--mode", "modes", multiple=True, type=click.Choice(MODES), default=("eager", "cudagraph"),
              show_default=True, help="Repeat for several; compile is off by default (minutes to build).")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="reduce-overhead", show_default=True,
              help="torch.compile mode of --mode compile.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(("fp16", "bf16")), default=("fp16", "bf16"),
              show_default=True)
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=BATCHES, show_default=True)
@click.option("--device", type=click.Choice(("cuda", "cpu")), default="cuda", show_default=True,
              help="cpu only checks the code paths; its numbers say nothing about a GPU.")
@click.option("--child", hidden=True, is_flag=True)
def main(model, kept_heads, out, seq, runs, rounds, modes, compile_mode, dtypes, batches, device, child):
    if child:
        print(json.dumps(_child(json.loads(sys.stdin.read()))))
        return
    if device == "cpu" and "cudagraph" in modes:
        raise click.BadParameter("cudagraph needs --device cuda", param_hint="--mode")
    import torch

    kept = json.loads(Path(kept_heads).read_text())["kept_heads"]
    results: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for dtype in dtypes:
            for mode in modes:
                for variant in ("baseline", "pruned"):  # alternate A/B inside every round
                    spec = {"model": model, "kept_heads": kept, "variant": variant, "dtype": dtype, "mode": mode,
                            "batches": list(batches), "seq": seq, "runs": runs, "device": device,
                            "compile_mode": compile_mode}
                    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_latency", "--model", model,
                                           "--kept-heads", kept_heads, "--out", out, "--child"],
                                          input=json.dumps(spec), capture_output=True, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"})
                    if proc.returncode != 0:
                        raise click.ClickException(f"{variant} {dtype} {mode} failed:\n{proc.stderr[-3000:]}")
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
        if row["mode"] == "compile":  # the first round compiles cold (unless Inductor's disk cache is warm)
            row["compile_s_rounds"] = [m["compile_s"] for m in measured]
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
    dtypes = [d for d in ("fp16", "bf16") if any(r["precision"] == d for r in rows)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    clock = "CUDA events" if rows[0]["device"] == "cuda" else "wall clock on a CPU: a code-path check, not a result"
    lines = [f"# GPU latency: {rows[0]['gpu']}, seq {rows[0]['seq']}, torch {rows[0]['versions']['torch']}", "",
             f"p50 ms per batch (median over rounds; {clock}); speedup = baseline p50 / pruned p50; "
             "ideal = FLOP ratio.", "",
             "| dtype | mode | batch | baseline p50 ms | pruned p50 ms | speedup | ideal | pruned seq/s | spread |",
             "|---|---|---|---|---|---|---|---|---|"]
    compiled = []
    for dtype in dtypes:
        for mode in modes:
            for batch in batches:
                base = by_key.get((f"baseline/torch-{dtype}-{mode}", batch))
                pruned = by_key.get((f"pruned/torch-{dtype}-{mode}", batch))
                if not base or not pruned:
                    continue
                lines.append(
                    f"| {dtype} | {mode} | {batch} | {base['p50_ms']:.3f} | {pruned['p50_ms']:.3f} | "
                    f"{base['p50_ms'] / pruned['p50_ms']:.2f}x | {base['flops_per_token'] / pruned['flops_per_token']:.2f}x | "
                    f"{pruned['throughput_per_s']:.0f} | {max(base['spread'], pruned['spread']):.2f} |")
                if mode == "compile":
                    compiled.append((dtype, batch, base, pruned))
    if compiled:
        lines += ["", f"torch.compile (mode {compiled[0][2]['compile_mode']}): seconds to compile, the first call at "
                  "each batch size (not in the latencies), per round; later rounds may hit Inductor's disk cache.", "",
                  "| dtype | batch | baseline compile s | pruned compile s |", "|---|---|---|---|"]
        for dtype, batch, base, pruned in compiled:
            lines.append(f"| {dtype} | {batch} | {' / '.join(f'{s:.1f}' for s in base['compile_s_rounds'])} | "
                         f"{' / '.join(f'{s:.1f}' for s in pruned['compile_s_rounds'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
