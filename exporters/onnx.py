"""Export a (pruned) sequence classifier to one self-contained ONNX file and check it against PyTorch.

The exporter is the legacy TorchScript one (``torch.onnx.export(..., dynamo=False)``). Both exporters
were measured on the tiny test model and on all-MiniLM-L6-v2 with uneven head counts and headless
layers: both give parity around 1e-7 on shapes other than the traced example, with sdpa and eager
attention. The legacy one is chosen because it exports in a fraction of a second instead of several
seconds, writes the weights inline (dynamo writes a ``.data`` sidecar), gives the same bytes on
every run, and produces the plain MatMul/Softmax graph that onnxruntime's transformer optimizer was
built to pattern-match. ``dynamo=True`` stays available, and gives the same parity.

torch and onnxruntime are imported inside the functions so that a benchmark child process that
only needs :func:`onnx_session` never loads torch.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:
    import onnxruntime
    from torch import Tensor, nn

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree on the logits by more than the tolerance."""


def default_example(batch: int = 2, seq: int = 8) -> dict[str, Tensor]:
    """A fixed (batch, seq) int64 example for tracing: ids in [1000, 2000), no padding, segment 0."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (batch, seq), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": torch.zeros_like(input_ids),
    }


def _logits_module(model: nn.Module, names: tuple[str, ...]):
    import torch

    class LogitsOnly(torch.nn.Module):
        """Positional inputs in, logits out: the exporters trace plain tensors, not ModelOutput."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(names, tensors))).logits

    return LogitsOnly().eval()


def export_onnx(
    model: nn.Module,
    path,
    *,
    opset: int = 18,
    example: Mapping[str, Tensor] | None = None,
    dynamo: bool = False,
) -> Path:
    """Export ``model`` to a single ONNX file with dynamic batch and sequence axes.

    The graph inputs are those of ``INPUT_NAMES`` present in ``example`` (all three by default), the
    output is ``logits``. The file is written atomically (temp file in the same folder, then
    renamed) and holds its weights inline. The model is exported in eval mode, fp32, without
    gradients; its training flag is restored afterwards.

    Args:
        model: a sequence classifier whose output has ``.logits``; may be pruned to uneven heads.
        path: where to write the ``.onnx`` file.
        opset: ONNX opset version.
        example: int64 tensors of shape (batch, seq) to trace with; a fixed random one when None.
        dynamo: use the torch.export-based exporter instead of the legacy TorchScript one.

    Returns:
        The path written.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = dict(example) if example is not None else default_example()
    names = tuple(n for n in INPUT_NAMES if n in example)
    args = tuple(example[n].to(torch.int64) for n in names)
    was_training = model.training
    module = _logits_module(model, names)  # puts model in eval mode too

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    sidecar = Path(f"{tmp}.data")
    try:
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            axes = {"dynamic_shapes": {"tensors": tuple({0: batch, 1: seq} for _ in names)}}
        else:
            axes = {"dynamic_axes": {**{n: {0: "batch", 1: "seq"} for n in names}, OUTPUT_NAME: {0: "batch"}}}
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter warns that it is deprecated, the tracer warns about transformers'
            # Python-side shape checks, and aten::index warns about negative indices (the mask's
            # come from arange); none changes the graph's correctness, which check_parity verifies
            # on an untraced shape.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                module, args, str(tmp),
                input_names=list(names), output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=dynamo, **axes,
            )
        if sidecar.exists() or any(t.data_location == onnx.TensorProto.EXTERNAL
                                   for t in onnx.load(str(tmp), load_external_data=False).graph.initializer):
            onnx.save(onnx.load(str(tmp)), str(tmp), save_as_external_data=False)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
    return path


def onnx_session(path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session with all graph optimizations and fixed thread counts.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; None lets onnxruntime choose (one per physical core).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _feeds(session, batch: Mapping) -> dict[str, np.ndarray]:
    declared = [i.name for i in session.get_inputs()]
    missing = [n for n in declared if n not in batch]
    if missing:
        raise ValueError(f"batch lacks the graph inputs {missing}; it has {sorted(batch)}")
    return {n: np.asarray(batch[n].numpy() if hasattr(batch[n], "numpy") else batch[n], dtype=np.int64)
            for n in declared}


def predict_onnx(session, batches: Iterable[Mapping]) -> np.ndarray:
    """Logits of every batch, concatenated along the batch axis.

    Each batch may hold extra entries (labels, inputs the graph pruned away); only the inputs the
    graph declares are fed.

    Args:
        session: from :func:`onnx_session`.
        batches: dicts of int tensors or arrays of shape (batch, seq).

    Returns:
        float32 array of shape (total examples, num_labels).
    """
    logits = [session.run([OUTPUT_NAME], _feeds(session, batch))[0] for batch in batches]
    return np.concatenate(logits, axis=0)


def check_parity(model: nn.Module, onnx_path, inputs: Mapping[str, Tensor], *, atol: float = 1e-4) -> float:
    """Max absolute difference between PyTorch and onnxruntime logits on ``inputs``.

    Pass a batch shape other than the traced example so that the dynamic axes are exercised.

    Args:
        model: the model that was exported.
        onnx_path: its ONNX file.
        inputs: int64 tensors of shape (batch, seq).
        atol: the largest difference accepted.

    Returns:
        The max abs diff on the logits.

    Raises:
        ParityError: the difference exceeds ``atol`` or the logits' shapes differ.
    """
    import torch

    session = onnx_session(onnx_path)
    got = predict_onnx(session, [inputs])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(**{k: v for k, v in inputs.items() if k in INPUT_NAMES}).logits.float().numpy()
    finally:
        model.train(was_training)
    shape = tuple(inputs["input_ids"].shape)
    if got.shape != expected.shape:
        raise ParityError(f"{onnx_path}: ONNX logits have shape {got.shape}, PyTorch {expected.shape} "
                          f"(inputs of shape {shape})")
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:  # also catches NaN
        raise ParityError(f"{onnx_path}: max abs diff {diff:.3g} on logits exceeds atol {atol:g} "
                          f"(inputs of shape {shape}, logits {expected.shape})")
    return diff
