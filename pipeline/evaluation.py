"""Task data for a run and the dev-set metric of any variant (torch model or ONNX file)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import data
from pipeline.config import RunConfig
from pipeline.progress import track

EVAL_BATCH = 64


@dataclass
class TaskData:
    task: data.TaskSpec
    tokenizer: object
    dev: data.Encoded

    def train(self, cfg: RunConfig) -> data.Encoded:
        examples = data.read_task(Path(cfg.data.train), self.task, cfg.data.max_train_examples)
        return data.encode(self.tokenizer, examples, cfg.data.max_seq_length)

    def dev_batches(self, batch_size: int = EVAL_BATCH):
        return data.batches(self.dev, batch_size, shuffle=False)

    def tracked_dev_batches(self, desc: str, batch_size: int = EVAL_BATCH):
        """:meth:`dev_batches` with a progress bar (a full dev pass takes seconds to minutes on a CPU)."""
        return track(self.dev_batches(batch_size), math.ceil(len(self.dev.labels) / batch_size), desc)


def task_spec(cfg: RunConfig) -> data.TaskSpec:
    d = cfg.data
    return data.task_from_config(
        d.task,
        text_columns=d.text_columns or None,
        label_column=d.label_column or None,
        label_names=d.label_names or None,
    )


def load_task_data(cfg: RunConfig, tokenizer) -> TaskData:
    task = task_spec(cfg)
    dev = data.read_task(Path(cfg.data.dev), task, cfg.data.max_eval_examples)
    return TaskData(task, tokenizer, data.encode(tokenizer, dev, cfg.data.max_seq_length))


def score(task: data.TaskSpec, logits: np.ndarray, labels) -> dict[str, float]:
    predictions = logits[:, 0] if task.label_names is None else logits.argmax(-1)
    return data.compute_metrics(task, predictions, labels)


def evaluate_torch(model, task_data: TaskData) -> dict[str, float]:
    from pipeline.training import predict

    return score(task_data.task, predict(model, task_data.tracked_dev_batches("evaluate")), task_data.dev.labels)


def evaluate_onnx(path: Path, task_data: TaskData, threads: int) -> dict[str, float]:
    from exporters.onnx import onnx_session, predict_onnx

    session = onnx_session(path, threads=threads)
    logits = predict_onnx(session, task_data.tracked_dev_batches(f"evaluate {Path(path).name}"))
    return score(task_data.task, logits, task_data.dev.labels)
