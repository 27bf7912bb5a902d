"""The command line: bad input exits 2 with one line; the integration tier runs the real pipeline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"


def dsprune(*args, cwd=ROOT, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_is_instant_and_lists_every_stage():
    result = dsprune("--help")
    assert result.returncode == 0
    for stage in ("run", "finetune", "harden", "prune", "export", "quantize", "bench", "report"):
        assert stage in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["run", "-c", "configs/does-not-exist.yaml"], "configs/does-not-exist.yaml: config file not found"),
    (["run", "-c", "configs/tiny-smoke.yaml", "--set", "prune.kep=3"], "prune.kep: unknown key; valid keys: method"),
    (["run", "-c", "configs/tiny-smoke.yaml", "--set", "prune.keep=0"], "prune.keep: must be a positive number"),
    (["run", "-c", "configs/tiny-smoke.yaml", "--set", "prune.keep=2.5"], "prune.keep: expected int, got 2.5"),
    (["run", "-c", "configs/tiny-smoke.yaml", "--set", "finetune.lr=fast"], "finetune.lr: expected float, got 'fast'"),
])
def test_bad_config_exits_2_with_one_line(args, expected):
    result = dsprune(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_inputs_found_before_training_exit_2(tmp_path):
    cases = [
        (["--set", "prune.keep=73"], "prune.keep: 73 exceeds the model's 72 heads"),
        (["--set", "prune.per_layer=true", "--set", "prune.keep=10"], "cannot be split evenly over 6 layers"),
        (["--set", f"data.train={tmp_path}/missing.tsv"], "missing.tsv"),
        (["--set", f"model.name={tmp_path}"], "has no config.json"),
    ]
    for extra, expected in cases:
        result = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={tmp_path}/run", *extra)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert expected in result.stderr.strip().splitlines()[-1]


def test_config_overrides_and_errors_are_gathered():
    cfg = load_config(ROOT / "configs" / "sst2-minilm.yaml", ["prune.keep=24", "bench.batches=[1,8]"])
    assert cfg.prune.keep == 24 and cfg.bench.batches == (1, 8)
    assert cfg.prune.temperature_end == pytest.approx(1e-8)
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sst2-minilm.yaml", ["prune.keep=-1", "bench.seq=x", "nope=1"])
    message = str(err.value)
    assert "\n" not in message
    assert all(s in message for s in ("prune.keep", "bench.seq", "nope: unknown key"))


@pytest.mark.integration
@pytest.mark.skipif(not SST2.is_dir(), reason="needs ../shared/data/glue/SST-2")
def test_run_end_to_end_on_the_bundled_model(tmp_path):
    run_dir = tmp_path / "run"
    result = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Report: {run_dir / 'report' / 'report.md'}" in result.stdout

    from benchmarks.report import validate_report

    report = json.loads((run_dir / "report" / "report.json").read_text())
    validate_report(report)
    assert report["model"]["heads_kept"] == 24 and report["model"]["heads_total"] == 72
    assert sum(len(v) for v in report["model"]["kept_heads"].values()) == 24
    names = {v["name"] for v in report["variants"]}
    assert {"baseline/torch-fp32", "pruned/torch-fp32", "pruned/onnx-fp32", "pruned/onnx-int8"} <= names
    assert [s["stage"] for s in report["stages"]] == ["fine-tuned", "hardened", "pruned", "onnx", "int8"]
    pruned = {v["name"]: v for v in report["variants"]}
    assert pruned["pruned/onnx-fp32"]["params"] < pruned["baseline/onnx-fp32"]["params"]
    assert all(v["latency"] and v["latency"][0]["p50_ms"] > 0 for v in report["variants"])
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["parity_max_abs_diff"]["pruned"] <= 1e-4
    for name in ("report.md", "latency.png", "head_mask.png"):
        assert (run_dir / "report" / name).stat().st_size > 0

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) and all(len(s["outputs"]) > 0 for s in manifest["stages"].values())

    # Unchanged config: every stage is skipped. A gate that cannot pass: only the report reruns, exit 1.
    again = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}")
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 7
    gated = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}",
                    "--set", "gates.max_metric_drop=-1.0")
    assert gated.returncode == 1
    assert "[report] running" in gated.stderr and "[finetune] up to date" in gated.stderr
    assert "gate failed: gate max_metric_drop" in gated.stderr.strip().splitlines()[-1]

    # A stage alone, on the run folder.
    alone = dsprune("harden", str(run_dir))
    assert alone.returncode == 0, alone.stderr[-2000:]
