"""The GPU latency benchmark's code paths on a CPU: the torch.compile mode, its table, the CLI's checks."""
from __future__ import annotations

import json

import pytest
from conftest import make_tiny_bert

from benchmarks.gpu_latency import _child, main, markdown

KEPT = {"0": [0, 2], "1": [1, 2, 3]}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-latency") / "tiny"
    make_tiny_bert().save_pretrained(folder)
    return str(folder)


def test_compile_mode_times_each_batch_after_compiling_it(tiny_folder):
    """Dynamo traces the pruned model once per batch size; compile time is reported apart from latency.

    The "eager" backend stands in for Inductor (which takes about a minute on this CPU); Dynamo's
    tracing, the per-batch recompilation and the no-recompile guard while timing are the same.
    """
    import torch

    spec = {"model": tiny_folder, "kept_heads": KEPT, "variant": "pruned", "dtype": "bf16", "mode": "compile",
            "batches": [1, 3], "seq": 8, "runs": 3, "device": "cpu", "compile_mode": "reduce-overhead",
            "compile_backend": "eager"}
    try:
        rows = _child(spec)
    finally:
        torch._dynamo.reset()
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["variant"] == "pruned/torch-bf16-compile" and row["mode"] == "compile"
        assert row["compile_mode"] == "reduce-overhead" and row["device"] == "cpu"
        assert row["compile_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        # the pruned model: 5 of 8 heads, so fewer parameters than the unpruned tiny BERT
        assert row["params"] < sum(p.numel() for p in make_tiny_bert().parameters())


def _row(variant: str, mode: str, batch: int, p50: float, compile_s=None) -> dict:
    row = {"variant": f"{variant}/torch-fp16-{mode}", "pruned": variant == "pruned", "precision": "fp16", "mode": mode,
           "device": "cuda", "batch": batch, "seq": 128, "p50_ms": p50, "throughput_per_s": batch * 1000 / p50,
           "flops_per_token": 22_415_628 if variant == "baseline" else 18_286_860, "spread": 1.01,
           "gpu": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.11.0+cu130", "cuda": "13.0"}}
    if compile_s is not None:
        row.update(compile_mode="reduce-overhead", compile_s=compile_s[0], compile_s_rounds=compile_s)
    return row


def test_markdown_lists_compile_rows_and_compile_seconds():
    rows = [_row("baseline", "cudagraph", 256, 3.841), _row("pruned", "cudagraph", 256, 3.293),
            _row("baseline", "compile", 256, 3.5, [41.2, 3.1, 3.0]), _row("pruned", "compile", 256, 2.9, [38.7, 2.9, 2.8])]
    text = markdown(rows)
    assert "| fp16 | cudagraph | 256 | 3.841 | 3.293 | 1.17x | 1.23x | 77741 | 1.01 |" in text
    assert "| fp16 | compile | 256 | 3.500 | 2.900 | 1.21x | 1.23x | 88276 | 1.01 |" in text
    assert text.index("| cudagraph |") < text.index("| compile |")
    assert "torch.compile (mode reduce-overhead)" in text
    assert "| fp16 | 256 | 41.2 / 3.1 / 3.0 | 38.7 / 2.9 / 2.8 |" in text
    assert "compile s" not in markdown(rows[:2])


def test_cli_refuses_cuda_graphs_on_a_cpu(tiny_folder, tmp_path):
    from click.testing import CliRunner

    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"kept_heads": KEPT}))
    result = CliRunner().invoke(main, ["--model", tiny_folder, "--kept-heads", str(mask), "--out", str(tmp_path),
                                       "--device", "cpu", "--mode", "cudagraph"])
    assert result.exit_code == 2 and "cudagraph needs --device cuda" in result.output
