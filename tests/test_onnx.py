"""ONNX export, parity with PyTorch on untraced shapes, and int8 quantization, on the tiny model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_bert
from onnx import numpy_helper

from exporters.onnx import ParityError, check_parity, default_example, export_onnx, onnx_session, predict_onnx
from exporters.quantize import PRESETS, quantize

TRACED = default_example(batch=2, seq=8)  # unpadded; tiny_inputs is (3, 11) with padding


def random_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


def keep_heads_of_layer0(model, keep: list[int]):
    """Slice layer 0's q/k/v rows and output-projection columns by hand, as surgery does."""
    attention = model.bert.encoder.layer[0].attention
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    rows = torch.tensor([h * head_dim + d for h in keep for d in range(head_dim)])
    for name in ("query", "key", "value"):
        old = getattr(attention.self, name)
        new = torch.nn.Linear(old.in_features, len(rows))
        new.weight.data = old.weight.data[rows].clone()
        new.bias.data = old.bias.data[rows].clone()
        setattr(attention.self, name, new)
    old = attention.output.dense
    new = torch.nn.Linear(len(rows), old.out_features)
    new.weight.data = old.weight.data[:, rows].clone()
    new.bias.data = old.bias.data.clone()
    attention.output.dense = new
    attention.self.num_attention_heads = len(keep)
    attention.self.all_head_size = len(rows)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_tiny_bert()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", example=TRACED)
    return model, path


def test_parity_on_a_shape_other_than_the_traced_example(exported, tiny_inputs):
    model, path = exported
    assert tuple(tiny_inputs["input_ids"].shape) != tuple(TRACED["input_ids"].shape)
    assert check_parity(model, path, tiny_inputs, atol=1e-4) <= 1e-4


def test_graph_has_dynamic_batch_and_sequence_axes(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for tensor in graph.input:
        assert [d.dim_param for d in tensor.type.tensor_type.shape.dim] == ["batch", "seq"]
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in graph.output] == ["logits"]


def test_padding_is_honoured_by_the_graph(exported, tiny_inputs):
    model, path = exported
    session = onnx_session(path, threads=1)
    padded = predict_onnx(session, [tiny_inputs])[1]
    trimmed = {k: v[1:2, :7] for k, v in tiny_inputs.items()}  # row 1 is padded from position 7
    np.testing.assert_allclose(padded, predict_onnx(session, [trimmed])[0], atol=1e-5)


def test_export_is_one_file_and_leaves_no_temp_files(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"]
    assert all(t.data_location != onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def test_export_is_deterministic(exported, tmp_path):
    model, path = exported
    again = export_onnx(model, tmp_path / "again.onnx", example=TRACED)
    assert again.read_bytes() == path.read_bytes()


def test_export_keeps_the_training_flag(tmp_path):
    model = make_tiny_bert().train()
    export_onnx(model, tmp_path / "m.onnx")
    assert model.training


def test_pruned_uneven_model_exports_with_parity(tmp_path, tiny_inputs):
    model = keep_heads_of_layer0(make_tiny_bert(), keep=[1, 3])
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 16
    assert model.bert.encoder.layer[1].attention.self.query.out_features == 32
    path = export_onnx(model, tmp_path / "pruned.onnx", example=TRACED)
    assert check_parity(model, path, tiny_inputs) <= 1e-4


def test_headless_layer_exports_with_parity(tmp_path, tiny_inputs):
    from pipeline.architectures import HeadlessAttention

    model = keep_heads_of_layer0(make_tiny_bert(), keep=[2])
    attention = model.bert.encoder.layer[1].attention
    model.bert.encoder.layer[1].attention = HeadlessAttention(attention.output.dense.bias, attention.output.LayerNorm)
    path = export_onnx(model, tmp_path / "headless.onnx", example=TRACED)
    assert check_parity(model, path, tiny_inputs) <= 1e-4


def test_dynamo_exporter_gives_one_file_with_parity(tmp_path, tiny_inputs):
    model = keep_heads_of_layer0(make_tiny_bert(), keep=[0, 2, 3])
    path = export_onnx(model, tmp_path / "dynamo.onnx", example=TRACED, dynamo=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamo.onnx"]
    assert check_parity(model, path, tiny_inputs) <= 1e-4


def test_corrupted_weights_raise_parity_error(exported, tmp_path, tiny_inputs):
    model, path = exported
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if t.name.endswith("classifier.bias"))
    shifted = numpy_helper.to_array(bias).copy()
    shifted[0] += 0.01
    bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))
    corrupted = tmp_path / "corrupted.onnx"
    onnx.save(proto, str(corrupted))
    with pytest.raises(ParityError, match=r"max abs diff 0\.01 .*atol 0\.0001.*\(3, 11\)"):
        check_parity(model, corrupted, tiny_inputs, atol=1e-4)


def test_predict_onnx_concatenates_and_ignores_extra_keys(exported, tiny_inputs):
    model, path = exported
    session = onnx_session(path, threads=1)
    batches = [{**tiny_inputs, "labels": torch.zeros(3)}, random_inputs(4, 5, seed=2)]
    logits = predict_onnx(session, batches)
    assert logits.shape == (7, 2)
    with torch.no_grad():
        expected = model(**random_inputs(4, 5, seed=2)).logits.numpy()
    np.testing.assert_allclose(logits[3:], expected, atol=1e-5)


def test_predict_onnx_names_a_missing_input(exported):
    _, path = exported
    with pytest.raises(ValueError, match="token_type_ids"):
        predict_onnx(onnx_session(path), [{"input_ids": np.ones((1, 4)), "attention_mask": np.ones((1, 4))}])


def test_int8_dynamic_is_smaller_and_agrees_on_argmax(exported, tmp_path):
    _, path = exported
    int8 = quantize(path, tmp_path / "tiny-int8.onnx", "int8-dynamic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-int8.onnx"]
    # The tiny model's weights are mostly its 30522 x 32 embedding table, quantized via Gather.
    assert path.stat().st_size / int8.stat().st_size > 3.0
    graph_ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "DynamicQuantizeLinear" in graph_ops or "MatMulInteger" in graph_ops
    batch = random_inputs(256, 16, seed=3)
    fp32 = predict_onnx(onnx_session(path), [batch])
    quantized = predict_onnx(onnx_session(int8), [batch])
    assert (fp32.argmax(-1) == quantized.argmax(-1)).mean() >= 0.95
    # The random model's logits are nearly tied, so also check that the quantized model tracks
    # how they vary across inputs rather than only where they land.
    margin_fp32, margin_int8 = fp32[:, 0] - fp32[:, 1], quantized[:, 0] - quantized[:, 1]
    assert np.corrcoef(margin_fp32, margin_int8)[0, 1] > 0.95


def test_unknown_preset_lists_the_valid_names(exported, tmp_path):
    _, path = exported
    with pytest.raises(ValueError, match="int8-dynamic") as error:
        quantize(path, tmp_path / "x.onnx", "int4-magic")
    assert "int4-magic" in str(error.value)
    assert not (tmp_path / "x.onnx").exists()


def test_presets_are_frozen():
    preset = PRESETS["int8-dynamic"]
    assert preset.per_channel and preset.weight_type == "QInt8"
    with pytest.raises(AttributeError):
        preset.per_channel = False
