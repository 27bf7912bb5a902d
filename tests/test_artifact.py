"""The deployable artifact folder on the tiny model: manifest, a fresh-process round trip with
onnxruntime + tokenizers only, predict (library and CLI), and optimum in its own environment."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, make_tiny_bert, run_cli

from exporters.artifact import (ArtifactFormatError, TaskInfo, Variant, build_artifact, load_artifact, read_manifest,
                                sha256_file, verify_artifact)
from exporters.onnx import export_onnx
from exporters.optimize import optimize_onnx
from exporters.quantize import quantize
from pipeline.stages.artifact import choose

LABELS = ("negative", "positive")
MAX_LENGTH = 24
TEXTS = ["a gripping , beautifully acted film", "the plot is thin and the jokes fall flat", "long",
         "an unexpectedly moving story about two brothers who never quite understood each other , told slowly"]
OPTIMUM_PYTHON = ROOT / ".venv-optimum" / "bin" / "python"


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tokenizer):
    work = tmp_path_factory.mktemp("artifact-src")
    model = make_tiny_bert()
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {n: i for i, n in enumerate(LABELS)}
    checkpoint = work / "checkpoint"
    model.config.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    plain = export_onnx(model, work / "plain.onnx")
    fused = optimize_onnx(plain, work / "fused.onnx")
    int8 = quantize(fused.path, work / "int8.onnx", "int8-dynamic")
    variants = [
        Variant(source=fused.path, file="model-fp32.onnx", precision="fp32", preset=None, graph="fused",
                device="cpu", metric={"accuracy": 0.75}, drop=0.0, fused_ops=fused.fused,
                latency={"p50_ms": 2.0, "batch": 1, "seq": 32, "threads": 2}),
        Variant(source=int8, file="model-int8-dynamic.onnx", precision="int8", preset="int8-dynamic",
                graph="fused", device="cpu", metric={"accuracy": 0.74}, drop=0.01,
                latency={"p50_ms": 1.0, "batch": 1, "seq": 32, "threads": 2}),
    ]
    task = TaskInfo(name="sst2", metric="accuracy", label_names=LABELS, text_segments=1, max_length=MAX_LENGTH,
                    eval_examples=64)
    folder = tmp_path_factory.mktemp("artifact") / "artifact"
    manifest = build_artifact(folder, variants, chosen="model-fp32.onnx", checkpoint=checkpoint, task=task,
                              why_chosen="the test's choice", made_by={"tool": "dsprune-test"})
    return folder, manifest, model, tokenizer


def reference_logits(model, tokenizer, texts) -> np.ndarray:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy()


def test_manifest_describes_every_file(tiny_artifact):
    folder, manifest, _, _ = tiny_artifact
    assert read_manifest(folder) == manifest
    names = {"model.onnx", "model-fp32.onnx", "model-int8-dynamic.onnx", "config.json", "tokenizer.json",
             "tokenizer_config.json", "README.md"}
    assert names <= set(manifest["files"]) and set(manifest["files"]) | {"manifest.json"} == {
        p.name for p in folder.iterdir()}
    assert all(sha256_file(folder / n) == e["sha256"] for n, e in manifest["files"].items())
    assert manifest["files"]["model.onnx"] == manifest["files"]["model-fp32.onnx"]
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert manifest["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}]
    assert manifest["opset"] == {"ai.onnx": 18, "com.microsoft": 1}
    assert manifest["labels"] == list(LABELS) and manifest["tokenizer"]["max_length"] == MAX_LENGTH
    assert manifest["tokenizer"]["pad_token"] == "[PAD]" and manifest["tokenizer"]["pad_id"] == 0
    by_file = {v["file"]: v for v in manifest["variants"]}
    assert by_file["model-fp32.onnx"]["fused_ops"]["Attention"] == 2
    assert by_file["model-fp32.onnx"]["bytes"] / by_file["model-int8-dynamic.onnx"]["bytes"] > 3.5
    card = (folder / "README.md").read_text()
    assert "negative, positive" in card and "`model-int8-dynamic.onnx` | int8 | fused | cpu | 0.7400 | +0.0100" in card
    assert "Tokenizer.from_file('tokenizer.json')" in card


def test_fresh_process_loads_it_with_onnxruntime_and_tokenizers_only(tiny_artifact):
    folder, _, model, tokenizer = tiny_artifact
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, onnxruntime as ort
        from tokenizers import Tokenizer
        folder = {str(folder)!r}
        manifest = json.load(open(folder + "/manifest.json"))
        tok = Tokenizer.from_file(folder + "/" + manifest["tokenizer"]["file"])
        tok.enable_truncation(manifest["tokenizer"]["max_length"])
        tok.enable_padding(pad_id=manifest["tokenizer"]["pad_id"], pad_token=manifest["tokenizer"]["pad_token"])
        enc = tok.encode_batch(json.loads(sys.stdin.read()))
        feeds = {{"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}}
        options = ort.SessionOptions()
        for key, value in manifest["cpu_session_config"].items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(folder + "/" + manifest["model"], options, providers=["CPUExecutionProvider"])
        assert session.get_session_options().get_session_config_entry(
            "optimization.disable_specified_optimizers") == "SkipLayerNormFusion"
        logits = session.run(["logits"], {{i.name: feeds[i.name] for i in session.get_inputs()}})[0]
        assert not {{"torch", "transformers", "pipeline", "exporters"}} & set(sys.modules), sorted(sys.modules)
        print(json.dumps({{"logits": logits.tolist(), "labels": [manifest["labels"][i] for i in logits.argmax(-1)]}}))
    """)
    done = subprocess.run([sys.executable, "-I", "-c", script], input=json.dumps(TEXTS), capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    expected = reference_logits(model, tokenizer, TEXTS)
    assert np.abs(np.array(result["logits"]) - expected).max() <= 1e-4
    assert result["labels"] == [LABELS[i] for i in expected.argmax(-1)]


def test_predict_gives_labels_and_probabilities_in_any_batch_size(tiny_artifact):
    folder, _, model, tokenizer = tiny_artifact
    artifact = load_artifact(folder)
    whole = artifact.predict(TEXTS, batch_size=32)
    one_by_one = artifact.predict(TEXTS, batch_size=1)  # no padding: same scores to float rounding
    assert [p["label"] for p in one_by_one] == [p["label"] for p in whole]
    assert [p["score"] for p in one_by_one] == pytest.approx([p["score"] for p in whole], abs=1e-5)
    expected = reference_logits(model, tokenizer, TEXTS)
    assert [p["label"] for p in whole] == [LABELS[i] for i in expected.argmax(-1)]
    for p in whole:
        assert sum(p["scores"].values()) == pytest.approx(1.0) and p["score"] == max(p["scores"].values())
    int8 = load_artifact(folder, file="model-int8-dynamic.onnx").logits(TEXTS)
    assert int8.shape == (len(TEXTS), 2)
    with pytest.raises(ArtifactFormatError, match="missing"):
        load_artifact(folder, file="model-fp64.onnx")


def test_verify_names_a_changed_file(tiny_artifact, tmp_path):
    import shutil

    folder, _, _, _ = tiny_artifact
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    verify_artifact(copy)
    (copy / "config.json").write_text("{}")
    with pytest.raises(ArtifactFormatError, match="config.json: sha256 differs"):
        verify_artifact(copy)
    with pytest.raises(ArtifactFormatError, match="manifest.json: missing"):
        read_manifest(tmp_path)


def test_predict_command_jsonl_table_and_file(tiny_artifact, tmp_path):
    folder, _, _, _ = tiny_artifact
    result = run_cli("predict", str(folder), *TEXTS[:2])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == TEXTS[:2] and all(r["label"] in LABELS for r in rows)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    table = run_cli("predict", str(folder), "--file", str(texts), "--format", "table", "--batch-size", "2")
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["label", "score", "text"] and len(lines) == 1 + len(TEXTS)
    assert [line.split()[0] for line in lines[1:3]] == [r["label"] for r in rows]
    empty = run_cli("predict", str(folder))
    assert empty.returncode == 2 and "give TEXT arguments or --file" in empty.stderr
    missing = run_cli("predict", str(tmp_path), "text")
    assert missing.returncode == 2 and "manifest.json: missing" in missing.stderr.strip().splitlines()[-1]


def test_choice_is_the_fastest_cpu_variant_within_the_bound():
    variants = {
        "model-fp32.onnx": {"model": "pruned", "preset": None, "device": "cpu", "drop": 0.0,
                            "latency": {"p50_ms": 10.0, "batch": 1, "seq": 8, "threads": 2}},
        "model-int8-dynamic.onnx": {"model": "pruned", "preset": "int8-dynamic", "device": "cpu", "drop": 0.02,
                                    "latency": {"p50_ms": 4.0, "batch": 1, "seq": 8, "threads": 2}},
        "model-int8-static.onnx": {"model": "pruned", "preset": "int8-static", "device": "cpu", "drop": 0.0,
                                   "latency": {"p50_ms": 5.0, "batch": 1, "seq": 8, "threads": 2}},
        "model-fp16.onnx": {"model": "pruned", "preset": "fp16", "device": "gpu", "drop": 0.0, "latency": None},
    }
    assert choose(variants, None)[0] == "model-int8-dynamic.onnx"
    name, why = choose(variants, 0.01)
    assert name == "model-int8-static.onnx" and "within quantize.max_drop 0.01" in why


@pytest.mark.skipif(not OPTIMUM_PYTHON.exists(),
                    reason="needs .venv-optimum (optimum-onnx wants transformers < 4.58): `make optimum-env`")
def test_optimum_loads_artifact(tiny_artifact):
    folder, manifest, _, _ = tiny_artifact
    for file in ("model.onnx", "model-int8-dynamic.onnx"):
        done = subprocess.run([str(OPTIMUM_PYTHON), str(ROOT / "exporters" / "optimum_check.py"), str(folder),
                               "--file", file], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["passed"] and result["max_abs_diff"] <= 1e-4 and result["labels"] == list(LABELS)
        assert result["versions"]["transformers"].startswith("4.") and result["shape"][1] == 2
