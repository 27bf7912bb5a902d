"""Stage export: baseline and pruned models to ONNX, each checked against PyTorch and scored.

Parity runs on a batch shape other than the traced example; a diff above ``export.parity_atol``
fails the stage.
"""
from __future__ import annotations

import torch

from exporters.onnx import check_parity, export_onnx
from pipeline import data
from pipeline.config import RunConfig
from pipeline.evaluation import evaluate_onnx, load_task_data
from pipeline.models import load_tokenizer
from pipeline.run import write_json_atomic
from pipeline.surgery import load_pruned

SOURCES = {"baseline": ("finetune", "baseline"), "pruned": ("prune", "model")}


def run(cfg: RunConfig, run_dir, out):
    torch.set_num_threads(cfg.threads)
    task_data = load_task_data(cfg, load_tokenizer(cfg.model))
    dev_examples = data.read_task(cfg.data.dev, task_data.task, 16)
    example = data.fixed_length_batch(task_data.tokenizer, dev_examples, batch=2, seq=16)
    untraced = data.fixed_length_batch(task_data.tokenizer, dev_examples, batch=5, seq=37)
    metrics, parity = {}, {}
    for name, (stage, folder) in SOURCES.items():
        model = load_pruned(run_dir / stage / folder)
        path = export_onnx(model, out / f"{name}.onnx", opset=cfg.export.opset, example=example)
        parity[name] = check_parity(model, path, untraced, atol=cfg.export.parity_atol)
        metrics[name] = evaluate_onnx(path, task_data, cfg.threads)
    write_json_atomic(out / "metrics.json", {"onnx-fp32": metrics, "parity_max_abs_diff": parity,
                                             "parity_shape": list(untraced["input_ids"].shape)})
    return {"parity_max_abs_diff": parity}
