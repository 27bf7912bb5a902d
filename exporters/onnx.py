"""Export a (pruned) classifier to one self-contained ONNX file and check it against PyTorch.

Text models take int64 ``input_ids``/``attention_mask``/``token_type_ids`` (those the model's
forward accepts) with dynamic batch and sequence axes; vision models (ViT) take float
``pixel_values`` with a dynamic batch axis and the fixed image size they were built for.

The exporter is the legacy TorchScript one (``torch.onnx.export(..., dynamo=False)``). Both exporters
were measured on the tiny test model and on all-MiniLM-L6-v2 with uneven head counts and headless
layers: both give parity around 1e-7 on shapes other than the traced example, with sdpa and eager
attention. The legacy one is chosen because it exports in a fraction of a second instead of several
seconds, writes the weights inline (dynamo writes a ``.data`` sidecar), gives the same bytes on
every run, and produces the plain MatMul/Softmax graph that onnxruntime's transformer optimizer was
built to pattern-match. ``dynamo=True`` stays available, and gives the same parity.

The trace uses ``eager`` attention whatever the model was trained with: it is the only form whose
graph onnxruntime's transformer optimizer fuses into ``Attention`` (the legacy ``sdpa``
decomposition adds IsNaN/Where guards and an extra reshape; see :mod:`exporters.optimize`).
The logits are the same to about 1e-7.

torch and onnxruntime are imported inside the functions so that a benchmark child process that
only needs :func:`onnx_session` never loads torch.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:
    import onnxruntime
    from torch import Tensor, nn

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUT_NAMES = ("pixel_values",)
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


def default_image_example(config, batch: int = 2) -> dict[str, Tensor]:
    """A fixed (batch, channels, height, width) float example at the model's image size."""
    import torch

    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, config.num_channels, height, width, generator=generator)}


def _is_image_model(model) -> bool:
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def _accepted_inputs(model, batch: Mapping) -> tuple[str, ...]:
    """The graph inputs: known input names present in ``batch`` that the model's forward names."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    known = IMAGE_INPUT_NAMES if _is_image_model(model) else INPUT_NAMES
    return tuple(n for n in known if n in batch and n in parameters)


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
    attn_implementation: str | None = "eager",
) -> Path:
    """Export ``model`` to a single ONNX file with dynamic batch and sequence axes.

    The graph inputs are those of ``INPUT_NAMES`` present in ``example`` that the model's forward
    accepts (all three by default for BERT), the output is ``logits``. An image model (ViT) gets one
    float ``pixel_values`` input with a dynamic batch axis; its image size is fixed. The file is
    written atomically (temp file in the same folder, then renamed) and holds its weights inline.
    The model is exported in eval mode, fp32, without gradients; its training flag is restored
    afterwards.

    Args:
        model: a sequence or image classifier whose output has ``.logits``; may be pruned to uneven heads.
        path: where to write the ``.onnx`` file.
        opset: ONNX opset version.
        example: int64 tensors of shape (batch, seq), or float ``pixel_values`` (batch, C, H, W), to
            trace with; a fixed random one when None.
        dynamo: use the torch.export-based exporter instead of the legacy TorchScript one.
        attn_implementation: the attention to trace (restored afterwards); None keeps the model's.
            Models that cannot switch (custom attention code) keep theirs.

    Returns:
        The path written.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = _is_image_model(model)
    if example is None:
        example = default_image_example(model.config) if image else default_example()
    example = dict(example)
    names = _accepted_inputs(model, example)
    if not names:
        raise ValueError(f"example has none of the inputs {IMAGE_INPUT_NAMES if image else INPUT_NAMES}; "
                         f"it has {sorted(example)}")
    args = tuple(example[n].to(torch.float32 if image else torch.int64) for n in names)
    dynamic = {n: ({0: "batch"} if image else {0: "batch", 1: "seq"}) for n in names}
    was_training = model.training
    module = _logits_module(model, names)  # puts model in eval mode too

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    sidecar = Path(f"{tmp}.data")
    try:
        if dynamo:
            dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq")}
            axes = {"dynamic_shapes": {"tensors": tuple({i: dims[d] for i, d in dynamic[n].items()} for n in names)}}
        else:
            axes = {"dynamic_axes": {**dynamic, OUTPUT_NAME: {0: "batch"}}}
        with torch.no_grad(), warnings.catch_warnings(), _attention(model, attn_implementation):
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


@contextmanager
def _attention(model, implementation: str | None):
    """Switch ``model`` (and its sub-models) to another attention implementation for a block."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = (implementation is not None and previous is not None and implementation != previous
              and hasattr(model, "set_attn_implementation") and model._can_set_attn_implementation())
    if switch:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


# Session config entries (``SessionOptions.add_session_config_entry``) of every CPU session dsprune
# times or evaluates; the artifact's manifest hands them on to deployments. onnxruntime 1.31 fuses a
# residual Add and LayerNormalization into SkipLayerNormalization only in the int8 graphs here (the
# fp32 graphs keep their bias Add in between), and on 2 AMD EPYC threads its CPU kernel took 129 us
# per call at 128 x 384 where the Add and LayerNormalization it replaces took 16 + 28 us. Without the
# fusion, int8-dynamic MiniLM at batch 1, seq 128 ran 7% (unpruned) and 13% (heads+FFN-pruned) faster,
# fp32 the same (benchmarks/results/graph-optimization-cpu.md).
CPU_SESSION_CONFIG = {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"}


def cpu_session_options(threads: int | None = None, config: Mapping[str, str] | None = None):
    """onnxruntime session options with all graph optimizations, fixed thread counts and ``config``.

    Args:
        threads: intra-op threads; None lets onnxruntime choose (one per physical core).
        config: session config entries; None means :data:`CPU_SESSION_CONFIG`, ``{}`` onnxruntime's defaults.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in (CPU_SESSION_CONFIG if config is None else config).items():
        options.add_session_config_entry(key, value)
    return options


def onnx_session(path, threads: int | None = None, config: Mapping[str, str] | None = None
                 ) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session made with :func:`cpu_session_options`.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; None lets onnxruntime choose (one per physical core).
        config: session config entries; None means :data:`CPU_SESSION_CONFIG`.
    """
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=cpu_session_options(threads, config),
                                providers=["CPUExecutionProvider"])


# onnxruntime's type strings for the inputs the exporter declares.
_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32}


def _feeds(session, batch: Mapping) -> dict[str, np.ndarray]:
    declared = {i.name: i.type for i in session.get_inputs()}
    missing = [n for n in declared if n not in batch]
    if missing:
        raise ValueError(f"batch lacks the graph inputs {missing}; it has {sorted(batch)}")
    return {n: np.asarray(batch[n].numpy() if hasattr(batch[n], "numpy") else batch[n],
                          dtype=_NUMPY_TYPES.get(kind, np.int64))
            for n, kind in declared.items()}


def predict_onnx(session, batches: Iterable[Mapping]) -> np.ndarray:
    """Logits of every batch, concatenated along the batch axis.

    Each batch may hold extra entries (labels, inputs the graph pruned away); only the inputs the
    graph declares are fed.

    Args:
        session: from :func:`onnx_session`.
        batches: dicts of int tensors or arrays of shape (batch, seq), or float ``pixel_values``.

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
        inputs: int64 tensors of shape (batch, seq), or float ``pixel_values`` for an image model.
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
            expected = model(**{k: inputs[k] for k in _accepted_inputs(model, inputs)}).logits.float().numpy()
    finally:
        model.train(was_training)
    shape = tuple(inputs["pixel_values" if _is_image_model(model) else "input_ids"].shape)
    if got.shape != expected.shape:
        raise ParityError(f"{onnx_path}: ONNX logits have shape {got.shape}, PyTorch {expected.shape} "
                          f"(inputs of shape {shape})")
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:  # also catches NaN
        raise ParityError(f"{onnx_path}: max abs diff {diff:.3g} on logits exceeds atol {atol:g} "
                          f"(inputs of shape {shape}, logits {expected.shape})")
    return diff
