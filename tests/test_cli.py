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
    for stage in ("run", "finetune", "harden", "prune", "export", "quantize", "bench", "report", "artifact",
                  "predict"):
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

    # Quantize: every preset scored against the fp32 pruned model, the recorded graph choice, sizes.
    from exporters.artifact import read_manifest, verify_artifact

    quant = json.loads((run_dir / "quantize" / "metrics.json").read_text())
    presets = ("int8-dynamic", "int8-static", "fp16")
    pruned_variants = {p: quant["variants"][f"pruned-{p}.onnx"] for p in ("fp32", *presets)}
    assert all(isinstance(v["drop"], float) and 0 <= v["metric"]["accuracy"] <= 1 for v in pruned_variants.values())
    assert quant["graphs"] == {"fp32": "plain", "int8-dynamic": "plain", "int8-static": "plain", "fp16": "fused"}
    layers_with_heads = sum(1 for heads in report["model"]["kept_heads"].values() if heads)
    assert pruned_variants["fp16"]["fused_ops"]["Attention"] == layers_with_heads  # fused per layer, uneven heads
    assert quant["fused"]["pruned"]["fused_ops"]["SkipLayerNormalization"] >= 6
    assert quant["fused"]["pruned"]["parity_max_abs_diff"] <= 1e-4
    assert all(pruned_variants[p]["size_ratio"] > 3.5 for p in ("int8-dynamic", "int8-static"))
    assert 1.9 < pruned_variants["fp16"]["size_ratio"] < 2.1

    # The artifact: every pruned variant, the fastest timed one as model.onnx, hashes that hold, a card.
    artifact = run_dir / "artifact"
    verify_artifact(artifact)
    card = read_manifest(artifact)
    assert {v["file"] for v in card["variants"]} == {f"model-{p}.onnx" for p in ("fp32", *presets)}
    timed = {v["file"]: v["latency"]["p50_ms"] for v in card["variants"] if v["latency"]}
    assert card["chosen"]["file"] == min(timed, key=timed.get) and "model-fp16.onnx" not in timed
    assert card["files"]["model.onnx"] == card["files"][card["chosen"]["file"]]
    assert card["labels"] == ["0", "1"] and card["tokenizer"]["max_length"] == 32
    if card["chosen"]["file"] == "model-int8-dynamic.onnx":  # the file bench timed as pruned/onnx-int8
        assert card["latency"]["variant"] == "pruned/onnx-int8" and card["latency"]["rows"][0]["p50_ms"] > 0
    assert "## Variants" in (artifact / "README.md").read_text()
    predicted = dsprune("predict", str(artifact), "a charming and often affecting journey", "--format", "jsonl")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout.splitlines()[0])["label"] in card["labels"]

    # Unchanged config: every stage is skipped. A gate that cannot pass: only the report reruns, exit 1.
    run_dir = copy_run(run_dir, tmp_path / "run")
    again = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}")
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 8
    gated = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}",
                    "--set", "gates.max_metric_drop=-1.0")
    assert gated.returncode == 1
    assert "[report] running" in gated.stderr and "[finetune] up to date" in gated.stderr
    assert "gate failed: gate max_metric_drop" in gated.stderr.strip().splitlines()[-1]
    # A preset bound that cannot hold: the quantize stage fails, exit 1, naming the presets.
    bounded = dsprune("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}",
                      "--set", "quantize.max_drop=-1.0")
    assert bounded.returncode == 1, bounded.stderr[-2000:]
    last = bounded.stderr.strip().splitlines()[-1]
    assert "gate failed: quantize.max_drop -1 crossed: preset int8-dynamic loses" in last and "preset fp16" in last

    # A stage alone, on the run folder: same inputs and seed, so the same mask.
    mask = (run_dir / "harden" / "mask.json").read_bytes()
    alone = dsprune("harden", str(run_dir))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert (run_dir / "harden" / "mask.json").read_bytes() == mask
