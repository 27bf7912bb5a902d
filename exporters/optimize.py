"""onnxruntime's transformer graph optimizer on exported encoders: fused Attention, SkipLayerNorm, BiasGelu.

Why exported graphs did not fuse Attention, and what makes them fuse (transformers 5.23, torch 2.13,
onnxruntime 1.31, legacy TorchScript export, opset 18):

- transformers 5 splits heads with ``view(batch, seq, -1, head_dim)``, so the Q/K/V ``Reshape``
  takes its shape from ``Concat(batch, seq, -1, head_dim)``. onnxruntime's attention fusion reads
  the head count from that Concat; with ``-1`` it falls back to the ``num_heads`` argument, which is
  0 ("detect") here and must stay so, because pruned layers have different head counts. The fusion
  then gives up ("Failed to detect num_heads"). :func:`make_head_counts_explicit` writes each
  layer's head count (the projection's width over ``head_dim``) into its Concat; onnxruntime then
  detects the heads per layer.
- Only ``eager`` attention gives the pattern onnxruntime matches (``MatMul -> Mul -> Add(mask) ->
  Softmax -> MatMul``, with transformers 5's ``Where/Expand/And`` mask, which onnxruntime 1.31
  knows). The legacy exporter's ``sdpa`` decomposition scales Q and K separately, guards the
  softmax with ``IsNaN/Where`` and reshapes the output once more: no pattern matches it. The
  dynamo exporter's graphs match neither (mask path with eager, QK path with sdpa). So
  :func:`exporters.onnx.export_onnx` traces with eager attention by default.

The optimized graph keeps the plain graph's inputs and outputs and runs on any onnxruntime (the
fused ops are ``com.microsoft`` contrib ops, which every onnxruntime build ships). It is not always
faster: on 2 AMD EPYC threads, onnxruntime 1.31's CPU kernels ran the plain graph 3-23% faster than
the fused one at batch 1, fp32 and int8, pruned and unpruned MiniLM; at batch 16 int8 plain was
6-48% faster and fp32 within the rounds' noise (benchmarks/results/graph-optimization-cpu.md; the
fused graph's SkipLayerNormalization kernel is slow here, see ``exporters.onnx.CPU_SESSION_CONFIG``),
so the quantize stage fuses only what is meant for GPUs (fp16) unless told otherwise.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OptimizeResult:
    """What the optimizer did to one graph.

    Attributes:
        path: the optimized file.
        fused: {op type: count} of fused ops in the optimized graph.
        explicit_head_counts: Q/K/V reshapes whose ``-1`` head count was made explicit.
    """

    path: Path
    fused: dict[str, int]
    explicit_head_counts: int


def _small_int_constants(graph) -> dict[str, np.ndarray]:
    """Values of the int64 initializers and Constant nodes with at most 8 elements (shape pieces)."""
    from onnx import TensorProto, numpy_helper

    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(node.output[0], a.t) for node in graph.node if node.op_type == "Constant"
                for a in node.attribute if a.name == "value"]
    return {name: numpy_helper.to_array(t) for name, t in tensors
            if t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 8}


def _projection_width(graph, producer: dict, name: str) -> int | None:
    """Output width of ``Add(MatMul(x, W), bias)`` (either Add order) when W is an initializer."""
    add = producer.get(name)
    if add is None or add.op_type != "Add":
        return None
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for operand in add.input:
        matmul = producer.get(operand)
        if matmul is not None and matmul.op_type == "MatMul" and len(shapes.get(matmul.input[1], [])) == 2:
            return shapes[matmul.input[1]][1]
    return None


def make_head_counts_explicit(model) -> int:
    """Replace the ``-1`` head count of every Q/K/V head-split reshape by the layer's head count, in place.

    The pattern is ``Reshape(Add(MatMul(x, W), b), Concat(batch, seq, -1, head_dim))``; the head
    count is ``W``'s width over ``head_dim``. Each patched Concat gets its own initializer, so a
    constant shared with other nodes is left alone.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        How many Concats were patched.
    """
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = _small_int_constants(graph)
    patched: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        heads, head_dim = constants.get(concat.input[2]), constants.get(concat.input[3])
        if heads is None or head_dim is None or heads.size != 1 or head_dim.size != 1:
            continue
        if int(heads.reshape(-1)[0]) != -1 or int(head_dim.reshape(-1)[0]) <= 0:
            continue
        width = _projection_width(graph, producer, node.input[0])
        head_dim = int(head_dim.reshape(-1)[0])
        if width is None or width % head_dim:
            continue
        count = width // head_dim
        key = concat.output[0]
        if patched.get(key, count) != count:
            raise ValueError(f"{key}: feeds reshapes of {patched[key]} and {count} heads")
        if key not in patched:
            name = f"{key}_num_heads"
            graph.initializer.append(numpy_helper.from_array(np.array([count], dtype=np.int64), name))
            concat.input[2] = name
        patched[key] = count
    return len(patched)


def fused_op_counts(model) -> dict[str, int]:
    """{op type: count} of the fused (``com.microsoft`` contrib) ops in an ONNX model or file.

    A plain export has none; the optimizer's fusions (Attention, SkipLayerNormalization, ...) and
    the quantizer's forms of them (QAttention, QEmbedLayerNormalization, ...) are all contrib ops.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


@contextmanager
def _quiet_onnxruntime_logs():
    # The fusions log every pattern they try (rotary embeddings, attention shapes) at warning level.
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("fusion", "onnx_model", "onnxruntime"))]
    names += ["fusion_attention", "fusion_utils", "onnx_model", "onnx_model_bert", "optimizer"]
    loggers = [logging.getLogger(n) for n in set(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def optimize_model_proto(model, *, model_type: str = "bert"):
    """onnxruntime's transformer fusions on an in-memory model; returns a new, topologically sorted model.

    Head counts are detected per layer (``num_heads=0``), so pruned layers with uneven heads fuse;
    onnxruntime's own session optimizations are not baked in (``opt_level=0``), so the graph stays
    portable across machines and execution providers. The ``com.microsoft`` opset is declared
    (onnxruntime's optimizer adds it only when it saves to a file itself; without it shape
    inference, and so quantization, fails on the fused graph).

    Args:
        model: an ``onnx.ModelProto`` (not modified).
        model_type: onnxruntime's optimizer family; "bert" covers BERT, RoBERTa, ELECTRA, MiniLM.

    Returns:
        (optimized ``onnx.ModelProto``, number of head counts made explicit).
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.ModelProto.FromString(model.SerializeToString())
    explicit = make_head_counts_explicit(model)
    with _quiet_onnxruntime_logs():
        optimized = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
        optimized.topological_sort()
    result = optimized.model
    if any(n.domain == "com.microsoft" for n in result.graph.node) and not any(
            o.domain == "com.microsoft" for o in result.opset_import):
        result.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return result, explicit


def optimize_onnx(onnx_in, onnx_out, *, model_type: str = "bert") -> OptimizeResult:
    """Fuse an exported encoder graph and write it to one self-contained file, atomically.

    Args:
        onnx_in: the plain graph from :func:`exporters.onnx.export_onnx` (traced with eager attention).
        onnx_out: where to write the optimized graph.
        model_type: onnxruntime's optimizer family; "bert" covers BERT, RoBERTa, ELECTRA, MiniLM.

    Returns:
        The path written, the fused op counts and how many head counts were made explicit.
    """
    import onnx

    optimized, explicit = optimize_model_proto(onnx.load(str(onnx_in)), model_type=model_type)
    save_atomic(optimized, onnx_out)
    return OptimizeResult(Path(onnx_out), fused_op_counts(optimized), explicit)


def save_atomic(model, path: Path) -> Path:
    """Write an ONNX model as one file (weights inline) through a temp file in the same folder."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save(model, str(tmp), save_as_external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
