"""onnxruntime's transformer fusions on the exported tiny model: which export fuses, op counts, parity."""
import logging

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_bert

from exporters.onnx import export_onnx, onnx_session, predict_onnx
from exporters.optimize import fused_op_counts, make_head_counts_explicit, optimize_onnx
from exporters.quantize import quantize
from pipeline.surgery import prune_heads_

FUSED_TINY = {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}


def padded_pairs(batch: int = 4, seq: int = 13) -> dict[str, torch.Tensor]:
    """A shape other than the traced one, with padding and a second segment."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    attention_mask[3, 9:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 7:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def random_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


def torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(**batch).logits.numpy()


def attention_heads(path) -> list[int]:
    graph = onnx.load(str(path)).graph
    return [next(a.i for a in n.attribute if a.name == "num_heads") for n in graph.node if n.op_type == "Attention"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = make_tiny_bert()
    return model, export_onnx(model, tmp_path_factory.mktemp("optimize") / "tiny.onnx")


def test_export_traces_eager_attention_and_restores_the_model(plain):
    model, _ = plain
    assert model.config._attn_implementation == "sdpa"  # the fixture's, untouched by the eager trace


def test_tiny_model_fuses_attention_layernorm_and_gelu(plain, tmp_path):
    model, path = plain
    result = optimize_onnx(path, tmp_path / "fused.onnx")
    assert result.fused == FUSED_TINY
    assert fused_op_counts(result.path) == FUSED_TINY and fused_op_counts(path) == {}
    assert result.explicit_head_counts == 6  # q, k and v of 2 layers
    assert attention_heads(result.path) == [4, 4]
    batch = padded_pairs()
    got = predict_onnx(onnx_session(result.path), [batch])
    assert np.abs(got - torch_logits(model, batch)).max() <= 1e-4


def test_pruned_layers_with_uneven_heads_fuse_each_with_its_own_head_count(tmp_path):
    model = make_tiny_bert(layers=3)
    prune_heads_(model, {0: [0, 2, 3], 1: [], 2: [1]})  # 3 heads, headless, 1 head
    path = export_onnx(model, tmp_path / "pruned.onnx")
    result = optimize_onnx(path, tmp_path / "fused.onnx")
    assert result.fused["Attention"] == 2  # the headless layer has no attention left to fuse
    assert attention_heads(result.path) == [3, 1]
    batch = padded_pairs(batch=5, seq=17)
    got = predict_onnx(onnx_session(result.path), [batch])
    assert np.abs(got - torch_logits(model, batch)).max() <= 1e-4


def test_implicit_head_count_is_why_attention_did_not_fuse(plain):
    # transformers 5 reshapes heads as (batch, seq, -1, head_dim); with num_heads=0 ("detect per
    # layer") onnxruntime cannot read the count and leaves attention unfused.
    from onnxruntime.transformers.optimizer import optimize_model

    _, path = plain
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)
    unpatched = optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    assert unpatched.get_fused_operator_statistics()["Attention"] == 0
    model = onnx.load(str(path))
    assert make_head_counts_explicit(model) == 6
    assert make_head_counts_explicit(model) == 0  # nothing left to patch


def test_sdpa_trace_does_not_fuse(tmp_path):
    # The legacy exporter's sdpa decomposition (IsNaN guard, extra reshape) matches no fusion.
    model = make_tiny_bert()
    path = export_onnx(model, tmp_path / "sdpa.onnx", attn_implementation=None)
    assert "IsNaN" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Attention" not in optimize_onnx(path, tmp_path / "fused.onnx").fused


def test_fused_graph_quantizes(plain, tmp_path):
    model, path = plain
    fused = optimize_onnx(path, tmp_path / "fused.onnx").path
    int8 = quantize(fused, tmp_path / "int8.onnx", "int8-dynamic")
    counts = fused_op_counts(int8)
    assert counts["QAttention"] == 2 and counts["QEmbedLayerNormalization"] == 1
    assert fused.stat().st_size / int8.stat().st_size > 3.0
    fp16 = quantize(fused, tmp_path / "fp16.onnx", "fp16")
    assert fused_op_counts(fp16)["Attention"] == 2
    batch = random_inputs(256, 16, seed=3)
    expected = torch_logits(model, batch)  # logits of about 0.03: tolerances are relative to that
    assert np.abs(predict_onnx(onnx_session(fp16), [batch]) - expected).max() <= 1e-3
    quantized = predict_onnx(onnx_session(int8), [batch])
    assert (quantized.argmax(-1) == expected.argmax(-1)).mean() >= 0.95
    assert np.corrcoef(quantized[:, 0] - quantized[:, 1], expected[:, 0] - expected[:, 1])[0, 1] > 0.99
