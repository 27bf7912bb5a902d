"""The command line: bad input exits 2 with one line; the integration tier runs the real pipeline."""
import json

import pytest

from conftest import ROOT, copy_run, run_cli
from pipeline.config import ConfigError, load_config

def dsprune(*args, **kwargs):
    return run_cli(*args, **kwargs)


def test_help_is_instant_and_lists_every_stage():
    result = dsprune("--help")
    assert result.returncode == 0
    for stage in ("run", "finetune", "harden", "prune", "export", "quantize", "bench", "report"):
        assert stage in result.stdout


def test_config_overrides_and_errors_are_gathered():
    cfg = load_config(ROOT / "configs" / "sst2-minilm.yaml", ["prune.keep=24", "bench.batches=[1,8]"])
    assert cfg.prune.keep == 24 and cfg.bench.batches == (1, 8)
    assert cfg.prune.temperature_end == pytest.approx(1e-8)
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sst2-minilm.yaml", ["prune.keep=-1", "bench.seqs=x", "nope=1"])
    message = str(err.value)
    assert "\n" not in message
    assert all(s in message for s in ("prune.keep", "bench.seqs", "nope: unknown key"))


@pytest.mark.integration
def test_run_end_to_end_on_the_bundled_model(smoke_run, tmp_path):
    run_dir, result = smoke_run
    assert f"Report: {run_dir / 'report' / 'report.md'}" in result.stdout

    from benchmarks.report import validate_report

    report = json.loads((run_dir / "report" / "report.json").read_text())
    validate_report(report)
    assert report["model"]["heads_kept"] == 24 and report["model"]["heads_total"] == 72
    assert sum(len(v) for v in report["model"]["kept_heads"].values()) == 24
    names = {v["name"] for v in report["variants"]}
    assert {"baseline/torch-fp32", "pruned/torch-fp32", "pruned/onnx-fp32", "pruned/onnx-int8"} <= names
    assert [s["stage"] for s in report["stages"]] == ["fine-tuned", "hardened", "pruned", "onnx", "int8"]
    variants = {v["name"]: v for v in report["variants"]}
    assert variants["pruned/onnx-fp32"]["params"] < variants["baseline/onnx-fp32"]["params"]
    assert all(v["latency"] and v["latency"][0]["p50_ms"] > 0 for v in report["variants"])
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["parity_max_abs_diff"]["pruned"] <= 1e-4
    for name in ("report.md", "latency.png", "head_mask.png"):
        assert (run_dir / "report" / name).stat().st_size > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) and all(len(s["outputs"]) > 0 for s in manifest["stages"].values())
    assert all(s["seed"] == 0 for s in manifest["stages"].values())

    # Unchanged config: every stage is skipped. A gate that cannot pass: only the report reruns, exit 1.
    run_dir = copy_run(run_dir, tmp_path / "run")
    again = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}")
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 7
    gated = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}",
                    "--set", "gates.max_metric_drop=-1.0")
    assert gated.returncode == 1
    assert "[report] running" in gated.stderr and "[finetune] up to date" in gated.stderr
    assert "gate failed: gate max_metric_drop" in gated.stderr.strip().splitlines()[-1]

    # A stage alone, on the run folder: same inputs and seed, so the same mask.
    mask = (run_dir / "harden" / "mask.json").read_bytes()
    alone = dsprune("harden", str(run_dir))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert (run_dir / "harden" / "mask.json").read_bytes() == mask
