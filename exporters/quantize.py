"""Named quantization presets for ONNX models, one config each: int8-dynamic, int8-static, fp16.

Every preset takes a plain exported graph or one fused by :mod:`exporters.optimize` (quantizing
after optimization works: the fused graph declares the ``com.microsoft`` opset and float is the
default tensor type where onnx shape inference cannot type a contrib op's output).
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.progress import progress_bar

METHODS = ("dynamic", "static", "fp16")
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")


@dataclass(frozen=True)
class QuantPreset:
    """How one preset turns an fp32 graph into a smaller one.

    Attributes:
        method: "dynamic" (int8 weights, activations quantized at run time), "static" (int8
            weights and activations in QDQ format, activation ranges calibrated on real batches)
            or "fp16" (every float weight and activation in half precision, for GPUs).
        precision: the short name in variant names and reports ("int8", "fp16").
        weight_type: onnxruntime ``QuantType`` name of int8 weights ("QInt8" or "QUInt8").
        activation_type: ``QuantType`` name of static activations.
        per_channel: one weight scale per output channel instead of one per tensor.
        op_types: operator types quantized (int8 presets).
        reduce_range: 7-bit weights, for CPUs without VNNI that would otherwise saturate.
        calibration: onnxruntime ``CalibrationMethod`` name of the static preset.
        fused_graph: the preset can quantize the graph fused by :mod:`exporters.optimize`.
        graph: the graph it quantizes under ``quantize.optimize: auto``, "plain" or "fused": fused
            only where benchmarks/graph_optimization.py measured it faster (or, for GPU presets,
            where the fused kernels are the point).
        gpu: the preset is meant for GPU execution providers.
    """

    method: str
    precision: str
    weight_type: str = "QInt8"
    activation_type: str = "QInt8"
    per_channel: bool = True
    op_types: tuple[str, ...] = ()
    reduce_range: bool = False
    calibration: str = "MinMax"
    fused_graph: bool = True
    graph: str = "plain"
    gpu: bool = False

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"method: {self.method!r}; valid: {', '.join(METHODS)}")
        for field in ("weight_type", "activation_type"):
            if getattr(self, field) not in ("QInt8", "QUInt8"):
                problems.append(f"{field}: {getattr(self, field)!r}; valid: QInt8, QUInt8")
        if self.calibration not in CALIBRATION_METHODS:
            problems.append(f"calibration: {self.calibration!r}; valid: {', '.join(CALIBRATION_METHODS)}")
        if self.method != "fp16" and not self.op_types:
            problems.append("op_types: empty for an int8 preset")
        if self.graph not in ("plain", "fused") or (self.graph == "fused" and not self.fused_graph):
            problems.append(f"graph: {self.graph!r}; valid: plain, or fused when fused_graph is set")
        if problems:
            raise ValueError("; ".join(problems))


PRESETS: dict[str, QuantPreset] = {
    # Per-channel weights keep the logits much closer to fp32 than per-tensor. Gather quantizes the
    # embedding tables, half of MiniLM's weights: file 3.9x smaller instead of 1.4x, with the same
    # argmax on random inputs and max logit diff 0.006 instead of 0.005 (pruned MiniLM, 64x64 batch).
    # Attention and EmbedLayerNormalization are the fused graph's forms of the same weights; the
    # fused graph quantizes (QAttention) but ran slower: 4.83 vs 3.92 ms at batch 1, 78.7 vs 53.2 ms
    # at batch 16 (heads+FFN-pruned MiniLM, seq 128, 2 threads; benchmarks/results/graph-optimization-cpu.md).
    "int8-dynamic": QuantPreset(
        method="dynamic", precision="int8",
        op_types=("MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization"),
    ),
    # QDQ with unsigned 8-bit activations and signed per-channel weights (U8S8), activation ranges
    # by MinMax over real training batches (moving average over batches, see _quantize_static).
    # Pruned MiniLM, batch 1, seq 128, 2 threads, AVX-512 VNNI, load 0.5: S8S8 ran 24.1 ms, U8S8
    # 7.2 (int8-dynamic 6.1, fp32 13.4); on SST-2 dev both within 0.002 accuracy of fp32. Gather
    # keeps the file 3.9x smaller at no measured cost. The fused ops have no QDQ form (and
    # calibration fails on the fused graph), so it quantizes the plain graph.
    "int8-static": QuantPreset(
        method="static", precision="int8", activation_type="QUInt8", op_types=("MatMul", "Gemm", "Gather"),
        calibration="MinMax", fused_graph=False,
    ),
    # For GPU execution providers, on the fused graph (onnxruntime's fused fp16 attention kernels
    # are what the fusion is for on GPUs); inputs stay int64 and logits fp32 (keep_io_types) so
    # callers feed and read the same arrays as the fp32 model.
    "fp16": QuantPreset(method="fp16", precision="fp16", graph="fused", gpu=True),
}


class BatchReader:
    """A ``CalibrationDataReader`` over real tokenized batches, fed as the graph's int64 inputs.

    Args:
        batches: dicts of int tensors or arrays of shape (batch, seq); extra keys (labels) are dropped.
        input_names: the graph inputs to feed.

    Attributes:
        on_batch: called with 1 each time a batch is handed out (a progress bar's ``update``).
    """

    on_batch: Callable[[int], object] | None = None

    def __init__(self, batches: Iterable[Mapping], input_names: Iterable[str]):
        names = tuple(input_names)
        batches = list(batches)
        missing = sorted({n for b in batches for n in names if n not in b})
        if missing:
            raise ValueError(f"calibration batches lack the graph inputs {missing}")
        self._feeds = [
            {n: np.asarray(b[n].numpy() if hasattr(b[n], "numpy") else b[n], dtype=np.int64) for n in names}
            for b in batches
        ]
        self._next = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._next, None)
        if feed is not None and self.on_batch is not None:
            self.on_batch(1)
        return feed

    def rewind(self) -> None:
        self._next = iter(self._feeds)


def _calibration_reader(batches, input_names):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(BatchReader, CalibrationDataReader):
        pass

    return Reader(batches, input_names)


@contextmanager
def _quiet_root_logger():
    # onnxruntime logs a pre-processing advice on the root logger at every call; its shape
    # inference fails on these graphs and skipping it changed neither size nor accuracy.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _graph_inputs(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def quantize(onnx_in, onnx_out, preset: str = "int8-dynamic", *, calibration: Iterable[Mapping] | None = None
             ) -> Path:
    """Quantize an fp32 ONNX file with a named preset into one self-contained file, atomically.

    Args:
        onnx_in: the fp32 model, plain or fused by :func:`exporters.optimize.optimize_onnx`.
        onnx_out: where to write the quantized model.
        preset: a key of :data:`PRESETS`.
        calibration: real tokenized batches (dicts with the graph's int64 inputs); required by
            the static preset, ignored by the others.

    Returns:
        The path written.

    Raises:
        ValueError: ``preset`` is unknown (the message lists the valid names), or a static preset
            got no calibration batches.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown quantization preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    config = PRESETS[preset]
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    reader = None
    if config.method == "static":
        reader = _calibration_reader(calibration or (), _graph_inputs(onnx_in))
        if not len(reader):
            raise ValueError(f"preset {preset!r} needs calibration batches; none given")
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{onnx_out.name}.", suffix=".tmp", dir=onnx_out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _quiet_root_logger():
            if config.method == "dynamic":
                _quantize_dynamic(onnx_in, tmp, config)
            elif config.method == "static":
                # Calibration runs the graph on every batch: the slow part of static quantization.
                with progress_bar(len(reader), f"calibrate {onnx_in.name}") as bar:
                    reader.on_batch = bar.update
                    _quantize_static(onnx_in, tmp, config, reader)
            else:
                _convert_fp16(onnx_in, tmp)
        os.replace(tmp, onnx_out)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)
    return onnx_out


def _quantize_dynamic(onnx_in: Path, onnx_out: Path, config: QuantPreset) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        onnx_in, onnx_out,
        op_types_to_quantize=list(config.op_types),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        weight_type=getattr(QuantType, config.weight_type),
        use_external_data_format=False,
        # onnx shape inference cannot type the outputs of fused contrib ops; they are all float.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )


def _quantize_static(onnx_in: Path, onnx_out: Path, config: QuantPreset, reader) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        onnx_in, onnx_out, reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(config.op_types),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=getattr(QuantType, config.activation_type),
        weight_type=getattr(QuantType, config.weight_type),
        calibrate_method=getattr(CalibrationMethod, config.calibration),
        use_external_data_format=False,
        # Activation ranges from the moving average of each batch's min and max, not the extremes
        # of all batches: on the default run (SST-2, 36 heads) int8-static lost 2.29 accuracy
        # points against fp32 with the extremes and 1.83 with the average.
        extra_options={"DefaultTensorType": TensorProto.FLOAT, "CalibMovingAverage": True},
    )


def _convert_fp16(onnx_in: Path, onnx_out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_in)), keep_io_types=True)
    onnx.save(model, str(onnx_out), save_as_external_data=False)
