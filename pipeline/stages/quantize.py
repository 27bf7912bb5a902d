"""Stage quantize: every configured preset of the baseline and pruned ONNX models, scored on dev."""
from __future__ import annotations

from exporters.quantize import PRESETS, quantize
from pipeline.config import RunConfig
from pipeline.evaluation import evaluate_onnx, load_task_data
from pipeline.models import load_tokenizer
from pipeline.run import write_json_atomic


def run(cfg: RunConfig, run_dir, out):
    unknown = [p for p in cfg.quantize.presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"quantize.presets: unknown {unknown}; valid: {', '.join(PRESETS)}")
    task_data = load_task_data(cfg, load_tokenizer(cfg.model))
    metrics, sizes = {}, {}
    for preset in cfg.quantize.presets:
        for name in ("baseline", "pruned"):
            path = quantize(run_dir / "export" / f"{name}.onnx", out / f"{name}-{preset}.onnx", preset)
            metrics.setdefault(preset, {})[name] = evaluate_onnx(path, task_data, cfg.threads)
            sizes[path.name] = path.stat().st_size
    write_json_atomic(out / "metrics.json", {"metrics": metrics, "file_bytes": sizes})
    return {"presets": list(cfg.quantize.presets)}
