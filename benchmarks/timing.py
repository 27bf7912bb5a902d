"""The one timing function, and each measured configuration in its own fresh process.

Timing two engines in one process, or with thread pools sized after import, inflated numbers 2-3x
on the 2-core machine, so :func:`measure_in_subprocess` starts ``python -m benchmarks.timing`` with
the thread environment already set; the child reads a JSON spec on stdin and writes one JSON
object on stdout. This module imports neither torch nor onnxruntime at the top, so the child
loads only the engine it measures.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("torch", "onnxruntime")
SPEC_KEYS = ("engine", "model", "batch", "seq", "threads", "warmup", "runs")
# Summary keys of one measurement that interleaved() carries from its rounds into a row.
STAT_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s")
AGGREGATES = ("best", "median")
# A round whose p50 is within this share of the best round's confirms it (see interleaved()).
CONFIRM_TOLERANCE = 0.05


class BenchmarkError(RuntimeError):
    """A benchmark child process failed or returned no result."""


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call (one batch), over ``runs`` timed calls.

    Attributes:
        p50_ms, p90_ms, p99_ms, mean_ms: per-call latency in milliseconds.
        throughput_per_s: items per second, ``batch * runs / total timed seconds``.
        runs: timed calls.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    runs: int


def time_callable(
    fn: Callable[[], object], *, batch: int, warmup: int = 5, runs: int = 30, min_seconds: float = 0.0
) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then time it with ``time.perf_counter``.

    Timing continues past ``runs`` calls until ``min_seconds`` have been spent, so fast calls still
    get a stable tail. ``fn`` must finish its work before returning (synchronize on a GPU).

    Args:
        fn: one call processes one batch.
        batch: items per call, for the throughput.
        warmup: untimed calls first (allocations, lazy initialisation, caches).
        runs: the least number of timed calls.
        min_seconds: the least total timed time.

    Returns:
        The latency percentiles and throughput.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for _ in range(warmup):
        fn()
    latencies = []
    total = 0.0
    while len(latencies) < runs or total < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        latencies.append(elapsed)
        total += elapsed
    ms = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=float(ms.mean()),
        throughput_per_s=batch * len(latencies) / total,
        runs=len(latencies),
    )


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that fix the math libraries' thread pools to ``threads``.

    onnxruntime reads no such variable; the child sets its session's intra-op threads explicitly.
    """
    value = str(threads)
    return {"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value, "OPENBLAS_NUM_THREADS": value}


def measure_in_subprocess(spec: dict, *, threads: int, timeout: float = 600) -> dict:
    """Measure one configuration in a fresh Python process with its thread counts fixed.

    Args:
        spec: ``engine`` ("torch" or "onnxruntime"), ``model`` (a checkpoint folder for torch, an
            ``.onnx`` file for onnxruntime), ``batch``, ``seq``, ``warmup``, ``runs``; other keys
            (``variant``, ``tokenizer``) are ignored by the child. The input is fixed random ids,
            so no tokenizer is needed.
        threads: intra-op threads of the engine and the OMP/MKL/OpenBLAS pools.
        timeout: seconds before the child is killed.

    Returns:
        The :class:`LatencyStats` fields plus ``engine``, ``batch``, ``seq``, ``threads``, the
        engine's own thread count (``torch_threads`` or ``ort_threads``), the child's
        ``omp_num_threads`` environment value, ``pid`` and ``load_avg`` before timing.

    Raises:
        ValueError: an unknown engine or a missing spec key.
        BenchmarkError: the child failed, timed out or printed no JSON result.
    """
    missing = [k for k in SPEC_KEYS if k not in {**spec, "threads": threads}]
    if missing:
        raise ValueError(f"benchmark spec lacks {missing}; it has {sorted(spec)}")
    if spec["engine"] not in ENGINES:
        raise ValueError(f"engine: unknown {spec['engine']!r}; valid: {', '.join(ENGINES)}")
    env = {**os.environ, **thread_env(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.timing"],
            input=json.dumps({**spec, "threads": threads}), capture_output=True, text=True,
            env=env, cwd=REPO_ROOT, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{spec['engine']} on {spec['model']}: no result within {timeout:g} s") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise BenchmarkError(
            f"{spec['engine']} on {spec['model']}: child exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return json.loads(lines[-1])


def interleaved(specs: list[dict], *, threads: int, rounds: int = 3, aggregate: str = "best",
                on_measured: Callable[[dict], object] | None = None) -> list[dict]:
    """Measure every spec once per round, A B C A B C ..., each in a fresh process.

    Interleaving spreads slow drifts of the machine (thermal, background load) over all specs
    instead of charging them to whichever ran last.

    How rounds become one row (``aggregate``):

    - ``"best"`` (default): the statistics of the round with the lowest p50. On the 2-core VM
      here, whole processes ran 1.5x slower at times with two threads (with one thread the same
      model stayed steady; a vCPU lent elsewhere for a while is the likeliest cause), so each
      round is fast or slow, and the median of five rounds flipped between the two modes from one
      bench run to the next (31% apart). Interference only adds time, so the best round is the
      reproducible one: it moved at most 2.4% between two runs of the same grid
      (benchmarks/results/bench-spread-cpu.md). ``confirmed_rounds`` says how many rounds came within
      ``CONFIRM_TOLERANCE`` of it; one alone means the best round may be luck or the machine was
      busy throughout (the report warns).
    - ``"median"``: the median over rounds of each of ``STAT_KEYS``.

    Args:
        specs: as for :func:`measure_in_subprocess`.
        threads: threads for every measurement.
        rounds: measurements per spec.
        aggregate: ``"best"`` or ``"median"``.
        on_measured: called with the spec just measured after each of the ``len(specs) * rounds``
            measurements (a progress bar ticks on it).

    Returns:
        Per spec, in order: ``STAT_KEYS`` aggregated as above, the child's other fields from the
        first round, ``rounds`` (the count), ``aggregate``, ``rounds_p50_ms`` (every round's p50),
        ``median_p50_ms``, ``confirmed_rounds``, ``spread`` (max/min p50 over rounds) and
        ``load_avg`` (the 1/5/15-minute load of the busiest round).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate: unknown {aggregate!r}; valid: {', '.join(AGGREGATES)}")
    raw: list[list[dict]] = [[] for _ in specs]
    for _ in range(rounds):
        for i, spec in enumerate(specs):
            raw[i].append(measure_in_subprocess(spec, threads=threads))
            if on_measured is not None:
                on_measured(spec)
    return [summarize_rounds(measurements, aggregate) for measurements in raw]


def summarize_rounds(measurements: list[dict], aggregate: str = "best") -> dict:
    """One row from the rounds of one spec (see :func:`interleaved`)."""
    p50s = [m["p50_ms"] for m in measurements]
    best = min(p50s)
    summary = {k: v for k, v in measurements[0].items() if k not in ("load_avg", "pid")}
    if aggregate == "best":
        summary.update({k: measurements[p50s.index(best)][k] for k in STAT_KEYS})
    else:
        summary.update({k: statistics.median(m[k] for m in measurements) for k in STAT_KEYS})
    summary.update({
        "rounds": len(measurements),
        "aggregate": aggregate,
        "rounds_p50_ms": p50s,
        "median_p50_ms": statistics.median(p50s),
        "confirmed_rounds": sum(p <= best * (1 + CONFIRM_TOLERANCE) for p in p50s),
        "spread": max(p50s) / best,
        "load_avg": list(max((m["load_avg"] for m in measurements), key=lambda load: load[0])),
    })
    return summary


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """The machine and package versions to record beside every benchmark number."""
    versions = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _fixed_inputs(batch: int, seq: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


def _measure_torch(spec: dict) -> tuple[Callable[[], object], dict]:
    import torch

    # Before any parallel work: the inter-op pool cannot be resized once used.
    torch.set_num_interop_threads(1)
    torch.set_num_threads(spec["threads"])
    from pipeline.surgery import load_pruned

    model = load_pruned(spec["model"])
    inputs = _fixed_inputs(spec["batch"], spec["seq"])

    def call():
        with torch.inference_mode():
            return model(**inputs).logits

    return call, {"torch_threads": torch.get_num_threads()}


def _measure_onnxruntime(spec: dict) -> tuple[Callable[[], object], dict]:
    from exporters.onnx import onnx_session

    # session_config: None (absent) is dsprune's CPU_SESSION_CONFIG, {} onnxruntime's defaults.
    session = onnx_session(spec["model"], threads=spec["threads"], config=spec.get("session_config"))
    declared = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    input_ids = rng.integers(1000, 2000, size=(spec["batch"], spec["seq"]), dtype=np.int64)
    inputs = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
              "token_type_ids": np.zeros_like(input_ids)}
    feeds = {k: v for k, v in inputs.items() if k in declared}
    return (lambda: session.run(None, feeds)), {
        "ort_threads": session.get_session_options().intra_op_num_threads
    }


def _child_main() -> None:
    spec = json.loads(sys.stdin.read())
    # Libraries may print while loading; only the final JSON line belongs on stdout.
    result_stream, sys.stdout = sys.stdout, sys.stderr
    measure = _measure_torch if spec["engine"] == "torch" else _measure_onnxruntime
    call, engine_info = measure(spec)
    load_avg = list(os.getloadavg())
    stats = time_callable(call, batch=spec["batch"], warmup=spec["warmup"], runs=spec["runs"],
                          min_seconds=spec.get("min_seconds", 0.0))
    result = {
        **asdict(stats),
        "engine": spec["engine"], "batch": spec["batch"], "seq": spec["seq"], "threads": spec["threads"],
        **engine_info,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "pid": os.getpid(),
        "load_avg": load_avg,
    }
    result_stream.write(json.dumps(result) + "\n")
    result_stream.flush()


if __name__ == "__main__":
    _child_main()
