"""Quantization presets on the tiny model: parity per preset, sizes, calibration, and the stage's rules."""
import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_bert

from exporters.onnx import export_onnx, onnx_session, predict_onnx
from exporters.optimize import fused_op_counts, optimize_onnx
from exporters.quantize import PRESETS, BatchReader, QuantPreset, quantize
from pipeline.run import GateFailed
from pipeline.stages.quantize import check_max_drop, graph_for


def batches(count: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random-id batches with some padding: the slice presets are judged and calibrated on."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[::3, seq // 2:] = 0
        out.append({"input_ids": input_ids, "attention_mask": attention_mask,
                    "token_type_ids": torch.zeros_like(input_ids)})
    return out


SLICE = batches(4, 64, 16, seed=3)
CALIBRATION = batches(4, 16, 16, seed=7)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize")
    model = make_tiny_bert()
    plain = export_onnx(model, folder / "plain.onnx")
    with torch.no_grad():
        expected = np.concatenate([model(**b).logits.numpy() for b in SLICE])
    return {"plain": plain, "fused": optimize_onnx(plain, folder / "fused.onnx").path}, expected


def accuracy_drop(logits: np.ndarray, reference: np.ndarray) -> float:
    """Accuracy lost on the slice when the fp32 model's own predictions are the labels."""
    return 1.0 - float((logits.argmax(-1) == reference.argmax(-1)).mean())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_tracks_fp32_on_a_fixed_slice(graphs, preset, tmp_path):
    sources, expected = graphs
    for graph in ("plain", "fused") if PRESETS[preset].fused_graph else ("plain",):
        path = quantize(sources[graph], tmp_path / f"{graph}.onnx", preset, calibration=CALIBRATION)
        got = predict_onnx(onnx_session(path), SLICE)
        assert got.dtype == np.float32 and got.shape == expected.shape
        ratio = sources["plain"].stat().st_size / path.stat().st_size
        if PRESETS[preset].precision == "fp16":
            # The random model's logits are about 0.03: 1e-3 is loose for fp16, which rounds at ~1e-5 here.
            assert np.abs(got - expected).max() <= 1e-3, graph
            assert 1.9 < ratio < 2.1
        else:
            assert accuracy_drop(got, expected) <= 0.05, graph
            margin, reference = got[:, 0] - got[:, 1], expected[:, 0] - expected[:, 1]
            assert np.corrcoef(margin, reference)[0, 1] > 0.98, graph
            assert ratio > 3.5  # embeddings quantized too


def test_cpu_sessions_leave_skip_layer_norm_unfused(graphs, tmp_path):
    # onnxruntime fuses the int8 graph's residual Add + LayerNormalization by default; dsprune's CPU
    # sessions turn that fusion off (its kernel ran slower here) and give the same logits.
    import onnxruntime as ort

    from exporters.onnx import cpu_session_options

    path = quantize(graphs[0]["plain"], tmp_path / "int8.onnx", "int8-dynamic")
    fused, logits = {}, {}
    for name, config in (("default", {}), ("dsprune", None)):
        options = cpu_session_options(threads=1, config=config)
        options.optimized_model_filepath = str(tmp_path / f"{name}-optimized.onnx")
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        logits[name] = predict_onnx(session, SLICE)
        nodes = onnx.load(options.optimized_model_filepath).graph.node
        fused[name] = sum(n.op_type == "SkipLayerNormalization" for n in nodes)
    assert fused["default"] > 0 and fused["dsprune"] == 0, fused
    assert np.abs(logits["default"] - logits["dsprune"]).max() < 1e-5


def test_fp16_keeps_int64_inputs_and_fp32_logits(graphs, tmp_path):
    sources, _ = graphs
    session = onnx_session(quantize(sources["fused"], tmp_path / "fp16.onnx", "fp16"))
    assert {i.type for i in session.get_inputs()} == {"tensor(int64)"}
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]


def test_static_preset_is_qdq_and_needs_calibration(graphs, tmp_path):
    sources, _ = graphs
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize(sources["plain"], tmp_path / "static.onnx", "int8-static")
    assert not (tmp_path / "static.onnx").exists()
    path = quantize(sources["plain"], tmp_path / "static.onnx", "int8-static", calibration=CALIBRATION)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and fused_op_counts(path) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static.onnx"]  # no calibration leftovers


def test_calibration_reader_feeds_only_graph_inputs_and_rewinds():
    reader = BatchReader(CALIBRATION[:2], ["input_ids", "attention_mask"])
    first = reader.get_next()
    assert sorted(first) == ["attention_mask", "input_ids"] and first["input_ids"].dtype == np.int64
    assert reader.get_next() is not None and reader.get_next() is None
    reader.rewind()
    assert np.array_equal(reader.get_next()["input_ids"], first["input_ids"])
    with pytest.raises(ValueError, match="token_type_ids"):
        BatchReader([{"input_ids": np.ones((1, 2))}], ["input_ids", "token_type_ids"])


def test_presets_validate_and_are_frozen():
    with pytest.raises(ValueError) as error:
        QuantPreset(method="int4", precision="int4", calibration="Magic")
    assert "method" in str(error.value) and "calibration" in str(error.value)
    with pytest.raises(AttributeError):
        PRESETS["int8-static"].per_channel = False
    assert PRESETS["int8-static"].activation_type == "QUInt8"  # S8S8 QDQ ran 3.4x slower on this CPU


def test_graph_per_precision():
    # auto: fused only where it was measured faster (fp16 is a GPU preset: fused for its kernels).
    assert {p: graph_for(p, "auto") for p in ("fp32", *PRESETS)} == {
        "fp32": "plain", "int8-dynamic": "plain", "int8-static": "plain", "fp16": "fused"}
    assert {p: graph_for(p, "always") for p in ("fp32", *PRESETS)} == {
        "fp32": "fused", "int8-dynamic": "fused", "int8-static": "plain", "fp16": "fused"}  # no QDQ of fused ops
    assert all(graph_for(p, "never") == "plain" for p in ("fp32", *PRESETS))
    with pytest.raises(ValueError, match="graph"):
        QuantPreset(method="static", precision="int8", op_types=("MatMul",), fused_graph=False, graph="fused")


def test_max_drop_gate_names_the_preset():
    variants = {
        "pruned-fp32.onnx": {"model": "pruned", "preset": None, "drop": 0.0, "metric": {"accuracy": 0.9}},
        "pruned-int8-dynamic.onnx": {"model": "pruned", "preset": "int8-dynamic", "drop": 0.004,
                                     "metric": {"accuracy": 0.896}},
        "pruned-int8-static.onnx": {"model": "pruned", "preset": "int8-static", "drop": 0.03,
                                    "metric": {"accuracy": 0.87}},
        "baseline-int8-static.onnx": {"model": "baseline", "preset": "int8-static", "drop": 0.5,
                                      "metric": {"accuracy": 0.4}},
    }
    check_max_drop(variants, "accuracy", None)
    check_max_drop(variants, "accuracy", 0.05)
    with pytest.raises(GateFailed) as error:
        check_max_drop(variants, "accuracy", 0.01)
    message = str(error.value)
    assert "preset int8-static loses 0.0300 accuracy (0.8700 vs fp32 0.9000)" in message
    assert "int8-dynamic" not in message and "quantize.max_drop 0.01" in message
