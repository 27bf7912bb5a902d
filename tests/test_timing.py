"""The timing function, per-process measurements with fixed threads, and interleaving."""
from __future__ import annotations

import itertools
import os
import time

import pytest
from conftest import make_tiny_bert

from benchmarks.timing import (
    BenchmarkError,
    interleaved,
    machine_info,
    measure_in_subprocess,
    summarize_rounds,
    time_callable,
)
from exporters.onnx import export_onnx


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return export_onnx(make_tiny_bert(), tmp_path_factory.mktemp("timing") / "tiny.onnx")


def onnx_spec(path, batch: int = 2, seq: int = 16) -> dict:
    return {"variant": "tiny/onnx-fp32", "engine": "onnxruntime", "model": str(path), "batch": batch,
            "seq": seq, "warmup": 2, "runs": 10, "tokenizer": "unused"}


def test_time_callable_orders_percentiles_of_a_sleep():
    calls = []
    # Nine 2 ms calls then one 20 ms call, repeated: the median is short, the 99th percentile long.
    durations = itertools.cycle([0.002] * 9 + [0.020])

    def sleep():
        calls.append(1)
        time.sleep(next(durations))

    stats = time_callable(sleep, batch=4, warmup=3, runs=40)
    assert len(calls) == 43 and stats.runs == 40
    assert 2.0 <= stats.p50_ms < 10.0
    assert stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.p99_ms >= 15.0
    assert stats.p50_ms < stats.mean_ms < stats.p99_ms
    # 40 calls of 4 items in about 36 * 2 + 4 * 20 = 152 ms.
    assert 4 * 40 / 0.152 * 0.5 < stats.throughput_per_s <= 4 * 40 / 0.152 * 1.01


def test_time_callable_runs_at_least_min_seconds():
    stats = time_callable(lambda: time.sleep(0.01), batch=1, warmup=0, runs=2, min_seconds=0.1)
    assert stats.runs >= 9


def test_time_callable_rejects_zero_runs():
    with pytest.raises(ValueError, match="runs"):
        time_callable(lambda: None, batch=1, runs=0)


def test_onnxruntime_measurement_runs_in_a_fresh_process_with_thread_env(tiny_onnx, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the child must get the requested count, not ours
    result = measure_in_subprocess(onnx_spec(tiny_onnx, batch=3, seq=12), threads=1)
    assert result["omp_num_threads"] == "1"
    assert result["ort_threads"] == 1
    assert result["pid"] != os.getpid()
    assert (result["engine"], result["batch"], result["seq"], result["threads"]) == ("onnxruntime", 3, 12, 1)
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] < 1000
    assert result["runs"] == 10
    assert result["throughput_per_s"] > 0
    assert len(result["load_avg"]) == 3


def test_torch_measurement_loads_a_saved_checkpoint(tmp_path):
    pytest.importorskip("pipeline.surgery", reason="surgery not ready")
    folder = tmp_path / "tiny"
    make_tiny_bert().save_pretrained(folder)
    spec = {"engine": "torch", "model": str(folder), "batch": 2, "seq": 8, "warmup": 1, "runs": 5}
    result = measure_in_subprocess(spec, threads=2)
    assert result["torch_threads"] == 2
    assert result["omp_num_threads"] == "2"
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_child_failure_is_reported_with_its_error(tmp_path):
    spec = {"engine": "onnxruntime", "model": str(tmp_path / "missing.onnx"), "batch": 1, "seq": 4,
            "warmup": 0, "runs": 1}
    with pytest.raises(BenchmarkError, match="missing.onnx"):
        measure_in_subprocess(spec, threads=1)


def test_unknown_engine_and_missing_keys_are_rejected(tiny_onnx):
    with pytest.raises(ValueError, match="valid: torch, onnxruntime"):
        measure_in_subprocess({**onnx_spec(tiny_onnx), "engine": "tensorrt"}, threads=1)
    spec = onnx_spec(tiny_onnx)
    del spec["runs"]
    with pytest.raises(ValueError, match="runs"):
        measure_in_subprocess(spec, threads=1)


def test_interleaved_keeps_spec_order_and_summarises_rounds(tiny_onnx):
    specs = [onnx_spec(tiny_onnx, batch=1), onnx_spec(tiny_onnx, batch=8)]
    measured = []
    results = interleaved(specs, threads=1, rounds=2, on_measured=lambda spec: measured.append(spec["batch"]))
    assert [r["batch"] for r in results] == [1, 8]
    assert measured == [1, 8, 1, 8]  # one call per measurement, A B A B: the bench stage's progress ticks
    for result in results:
        assert result["rounds"] == 2 and len(result["rounds_p50_ms"]) == 2
        assert result["p50_ms"] == min(result["rounds_p50_ms"])  # the best round by default
        assert result["spread"] == pytest.approx(max(result["rounds_p50_ms"]) / min(result["rounds_p50_ms"]))
        assert len(result["load_avg"]) == 3 and result["load_avg"][0] >= 0
    assert results[1]["p50_ms"] > results[0]["p50_ms"]  # 8x the work per call


def _round(p50, pid):
    return {"p50_ms": p50, "p90_ms": p50 + 1, "p99_ms": p50 + 2, "mean_ms": p50 + 0.5, "throughput_per_s": 1000 / p50,
            "engine": "onnxruntime", "batch": 1, "pid": pid, "load_avg": [float(pid), 0.0, 0.0]}


def test_rounds_become_one_row_from_the_best_round_or_the_median():
    # Two fast rounds and three slow ones (a process that lost a vCPU): the median is a slow round.
    rounds = [_round(p, i) for i, p in enumerate([13.0, 8.8, 13.3, 9.1, 12.9])]
    best = summarize_rounds(rounds, "best")
    assert best["p50_ms"] == 8.8 and best["p90_ms"] == 9.8 and best["throughput_per_s"] == 1000 / 8.8
    assert best["median_p50_ms"] == 12.9 and best["confirmed_rounds"] == 2  # 9.1 is within 5% of 8.8
    assert best["spread"] == pytest.approx(13.3 / 8.8) and best["rounds"] == 5 and best["aggregate"] == "best"
    assert best["load_avg"] == [4.0, 0.0, 0.0] and "pid" not in best
    median = summarize_rounds(rounds, "median")
    assert median["p50_ms"] == 12.9 and median["p90_ms"] == 13.9 and median["aggregate"] == "median"
    assert summarize_rounds([_round(8.8, 0)], "best")["confirmed_rounds"] == 1
    with pytest.raises(ValueError, match="aggregate"):
        interleaved([], threads=1, aggregate="mean")


def test_machine_info_names_the_cpu_and_versions():
    info = machine_info()
    assert info["cores"] >= 1 and len(info["load_avg"]) == 3
    assert info["cpu"]
    assert set(info["versions"]) == {"torch", "transformers", "onnx", "onnxruntime", "numpy"}
    assert info["versions"]["onnxruntime"]
