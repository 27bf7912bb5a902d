"""Task data: GLUE and custom table readers, tokenization, padded batches and task metrics.

Readers turn a file into ``Examples`` (text segments and label indices) or raise ``DataError`` with
the file, line and offending value in one line. Metrics are plain numpy so evaluation needs neither
scikit-learn nor scipy.
"""
from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")

# Batches in one length-sorted chunk when bucketing: large enough that padding stays small,
# small enough that a shuffled epoch still mixes examples from all over the file.
_BUCKET_CHUNK_BATCHES = 50


class DataError(ValueError):
    """Bad input data; the message is one line naming the file, the line or field, and the value."""


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's texts and labels live in its files, and how it is scored.

    Attributes:
        name: short task name, e.g. "sst2".
        text_columns: one or two column names; for headerless files, column indices as strings.
        label_column: the label's column name (or index as a string for headerless files).
        label_names: raw label strings in class-index order; None for a regression task.
        metrics: metric names from ``METRICS``; the first is the primary metric.
        has_header: whether the first line of a TSV file names the columns.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    has_header: bool = True

    def __post_init__(self):
        problems = []
        if not 1 <= len(self.text_columns) <= 2:
            problems.append(f"text_columns {list(self.text_columns)} must name 1 or 2 columns")
        if not self.label_column:
            problems.append("label_column is empty")
        if self.label_names is not None and len(self.label_names) < 2:
            problems.append(f"label_names {list(self.label_names)} must name at least 2 classes")
        if not self.metrics:
            problems.append("metrics is empty")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            problems.append(f"metrics {unknown} not in {list(METRICS)}")
        if problems:
            raise DataError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def primary_metric(self) -> str:
        """The metric that gates and reports rank variants by."""
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        """Number of classifier outputs: the class count, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)


_PAIR_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", ("sentence",), "label", ("0", "1"), ("accuracy",)),
        # CoLA has no header: source, label, original label, sentence.
        TaskSpec("cola", ("3",), "1", ("0", "1"), ("matthews",), has_header=False),
        TaskSpec("mrpc", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("accuracy", "f1")),
        TaskSpec("rte", ("sentence1", "sentence2"), "label", _PAIR_ENTAILMENT, ("accuracy",)),
        TaskSpec("qnli", ("question", "sentence"), "label", _PAIR_ENTAILMENT, ("accuracy",)),
        TaskSpec("mnli", ("sentence1", "sentence2"), "gold_label",
                 ("entailment", "neutral", "contradiction"), ("accuracy",)),
        TaskSpec("qqp", ("question1", "question2"), "is_duplicate", ("0", "1"), ("accuracy", "f1")),
        TaskSpec("stsb", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    )
}


def _task_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def task_from_config(
    name: str | None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> TaskSpec:
    """The ``TaskSpec`` a run's data config describes.

    Args:
        name: a GLUE task name in any case, with or without a dash ("SST-2", "sst2"), or any
            other name (e.g. "custom") for a task described by the remaining arguments.
        text_columns: for a custom task, the one or two columns holding the text.
        label_column: for a custom task, the column holding the label.
        label_names: for a custom task, raw label strings in class-index order; None for regression.
        metrics: for a custom task; defaults to ("accuracy",), or ("pearson", "spearman") for
            regression, where accuracy means nothing.

    Returns:
        The ``TASKS`` entry for a GLUE name, else a custom ``TaskSpec``.

    Raises:
        DataError: an unknown name without columns, or an invalid custom description.
    """
    if name and _task_key(name) in TASKS:
        return TASKS[_task_key(name)]
    if not text_columns or not label_column:
        raise DataError(
            f"data.task: {name!r} is not one of {sorted(TASKS)}; a custom task needs "
            "data.text_columns and data.label_column"
        )
    label_names = tuple(label_names) if label_names else None
    if metrics is None:
        metrics = ("pearson", "spearman") if label_names is None else ("accuracy",)
    return TaskSpec(name or "custom", tuple(text_columns), label_column, label_names,
                    tuple(metrics))


@dataclass(frozen=True)
class Examples:
    """Raw examples read from one file.

    Attributes:
        texts: one tuple of one or two text segments per example.
        labels: class indices, or floats for regression.
        source: the file they came from, for messages.
    """

    texts: list[tuple[str, ...]]
    labels: list[int] | list[float]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def read_task(path, task: TaskSpec, max_examples: int | None = None) -> Examples:
    """Read a GLUE-layout TSV file for ``task``.

    Quoting is disabled because GLUE's MRPC strings contain unbalanced quotes.

    Args:
        path: the TSV file.
        task: which columns hold the texts and label.
        max_examples: keep only the first N examples; None keeps all.

    Returns:
        The file's examples, in file order.

    Raises:
        DataError: a missing or unreadable file, a missing column, a row with the wrong number of
            columns, a label outside ``task.label_names``, or no examples at all.
    """
    records = _delimited_records(Path(path), "\t", csv.QUOTE_NONE, task.has_header)
    return _examples(records, str(path), task.text_columns, task.label_column, task.label_names,
                     max_examples)


def read_table(
    path,
    text_columns: Sequence[str],
    label_column: str,
    label_names: Sequence[str] | None,
    max_examples: int | None = None,
) -> Examples:
    """Read a custom table with named columns: ``.csv``, ``.tsv`` or ``.jsonl``, by extension.

    CSV files use standard quoting; TSV files are read like GLUE's (quoting disabled); JSONL files
    hold one JSON object per line.

    Args:
        path: the file.
        text_columns: the one or two columns holding the text.
        label_column: the column holding the label.
        label_names: raw label strings in class-index order; None for regression (float labels).
        max_examples: keep only the first N examples; None keeps all.

    Returns:
        The file's examples, in file order.

    Raises:
        DataError: as for ``read_task``, and for an unsupported extension or a line that is not a
            JSON object.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _delimited_records(path, ",", csv.QUOTE_MINIMAL, has_header=True)
    elif suffix == ".tsv":
        records = _delimited_records(path, "\t", csv.QUOTE_NONE, has_header=True)
    elif suffix == ".jsonl":
        records = _jsonl_records(path)
    else:
        raise DataError(f"{path}: unsupported extension {suffix!r}; use .csv, .tsv or .jsonl")
    names = tuple(label_names) if label_names is not None else None
    return _examples(records, str(path), tuple(text_columns), label_column, names, max_examples)


def _open_text(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # utf-8-sig: some GLUE copies (MRPC) ship with a byte-order mark before the header.
    return path.open(encoding="utf-8-sig", newline="")


def _delimited_records(path: Path, delimiter: str, quoting: int, has_header: bool
                       ) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (1-based line number, {column: value}) for every non-blank row."""
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            header = None
            for row in reader:
                if not row or row == [""]:
                    continue
                if header is None:
                    if has_header:
                        header = row
                        continue
                    header = [str(i) for i in range(len(row))]
                if len(row) != len(header):
                    raise DataError(
                        f"{path} line {reader.line_num}: expected {len(header)} columns, found "
                        f"{len(row)}"
                    )
                yield reader.line_num, dict(zip(header, row))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not utf-8 text ({err.reason} at byte {err.start})") from None
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: {err}") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {line_number}: not JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path} line {line_number}: expected a JSON object, found "
                        f"{type(record).__name__}"
                    )
                yield line_number, record
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not utf-8 text ({err.reason} at byte {err.start})") from None


def _examples(records, source: str, text_columns: tuple[str, ...], label_column: str,
              label_names: tuple[str, ...] | None, max_examples: int | None) -> Examples:
    if max_examples is not None and max_examples < 1:
        raise DataError(f"{source}: max_examples must be at least 1, got {max_examples}")
    label_index = {name: i for i, name in enumerate(label_names)} if label_names else None
    texts, labels = [], []
    for line_number, record in itertools.islice(records, max_examples):
        where = f"{source} line {line_number}"
        for column in (*text_columns, label_column):
            if column not in record:
                raise DataError(f"{where}: no column {column!r} (columns: {list(record)})")
        segments = []
        for column in text_columns:
            value = record[column]
            if not isinstance(value, str):
                raise DataError(f"{where}: column {column!r} is {value!r}, not text")
            segments.append(value)
        texts.append(tuple(segments))
        labels.append(_label(record[label_column], label_index, label_names, where))
    if not texts:
        raise DataError(f"{source}: no examples")
    return Examples(texts, labels, source)


def _label(raw, label_index: dict[str, int] | None, label_names, where: str) -> int | float:
    # JSONL labels may be numbers or booleans; compare them as the strings a TSV would hold.
    text = str(int(raw)) if isinstance(raw, bool) else str(raw).strip()
    if label_index is None:
        try:
            return float(text)
        except ValueError:
            raise DataError(f"{where}: label {text!r} is not a number") from None
    if text not in label_index:
        raise DataError(f"{where}: label {text!r} not in {list(label_names)}")
    return label_index[text]


@dataclass
class Encoded:
    """Tokenized examples, unpadded.

    Attributes:
        input_ids: token ids per example, special tokens included.
        token_type_ids: segment ids per example (0 for the first segment, 1 for the second).
        labels: class indices, or floats for regression.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int] | list[float]

    def __len__(self) -> int:
        return len(self.input_ids)


def _tokenize(tokenizer, texts: Sequence[tuple[str, ...]], **kwargs):
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if len(texts[0]) == 2 else None
    return tokenizer(first, second, truncation=True, return_token_type_ids=True, **kwargs)


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    """Tokenize examples, truncating each to ``max_length`` tokens; no padding.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        examples: the examples to tokenize; all with the same number of segments.
        max_length: the most tokens per example, special tokens included.

    Returns:
        Token and segment ids per example, with the labels carried over.
    """
    tokens = _tokenize(tokenizer, examples.texts, max_length=max_length)
    return Encoded(list(tokens["input_ids"]), list(tokens["token_type_ids"]), list(examples.labels))


def _batch_order(lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int, bucket: bool
                 ) -> list[np.ndarray]:
    count = len(lengths)
    if not shuffle:
        return [np.arange(start, min(start + batch_size, count))
                for start in range(0, count, batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    if bucket:
        chunk = batch_size * _BUCKET_CHUNK_BATCHES
        order = np.concatenate([
            part[np.argsort(lengths[part], kind="stable")]
            for part in (order[start:start + chunk] for start in range(0, count, chunk))
        ])
    groups = [order[start:start + batch_size] for start in range(0, count, batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))]


def batches(encoded: Encoded, batch_size: int, *, shuffle: bool, seed: int = 0, bucket: bool = True
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Padded tensor batches over one epoch; every example appears exactly once.

    Args:
        encoded: the tokenized examples.
        batch_size: examples per batch; the last batch may be smaller.
        shuffle: draw examples in a random order fixed by ``seed``; otherwise keep file order so
            predictions line up with labels.
        seed: the seed of the local random generator (global random state is never touched).
        bucket: when shuffling, sort chunks of about 50 batches by length so that each batch holds
            similar lengths and padding stays small; the batch order is shuffled afterwards.

    Yields:
        {"input_ids", "attention_mask", "token_type_ids", "labels"}: int64 tensors padded with 0 to
        the longest example in the batch; labels are float32 for regression.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not encoded.input_ids:
        return
    lengths = np.array([len(ids) for ids in encoded.input_ids])
    regression = isinstance(encoded.labels[0], float)
    label_dtype = torch.float32 if regression else torch.int64
    for index in _batch_order(lengths, batch_size, shuffle, seed, bucket):
        width = int(lengths[index].max())
        input_ids = torch.zeros(len(index), width, dtype=torch.int64)
        token_type_ids = torch.zeros_like(input_ids)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(index):
            n = lengths[i]
            input_ids[row, :n] = torch.tensor(encoded.input_ids[i])
            token_type_ids[row, :n] = torch.tensor(encoded.token_type_ids[i])
            attention_mask[row, :n] = 1
        yield {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": torch.tensor([encoded.labels[i] for i in index], dtype=label_dtype),
        }


def fixed_length_batch(tokenizer, examples: Examples, batch: int, seq: int
                       ) -> dict[str, torch.Tensor]:
    """One batch of real text of an exact shape, for latency benchmarks and ONNX tracing.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        examples: the texts to use, cycled when fewer than ``batch``.
        batch: rows in the batch.
        seq: tokens per row; longer texts are truncated, shorter ones padded.

    Returns:
        int64 "input_ids", "attention_mask" and "token_type_ids" of shape (batch, seq).
    """
    if not len(examples):
        raise DataError(f"{examples.source}: no examples")
    texts = [examples.texts[i % len(examples)] for i in range(batch)]
    tokens = _tokenize(tokenizer, texts, max_length=seq, padding="max_length", return_tensors="pt")
    return {name: tokens[name].to(torch.int64)
            for name in ("input_ids", "attention_mask", "token_type_ids")}


def compute_metrics(task: TaskSpec, predictions, labels) -> dict[str, float]:
    """Score predictions with every metric of ``task``.

    Args:
        task: names the metrics.
        predictions: class indices, or floats for regression.
        labels: gold class indices or floats, aligned with ``predictions``.

    Returns:
        {metric name: value} in ``task.metrics`` order.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must be equal-length, "
            "non-empty 1-d sequences"
        )
    return {name: float(_METRIC_FUNCTIONS[name](predictions, labels)) for name in task.metrics}


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their labels."""
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 with class 1 as the positive class; 0.0 when there are no true positives."""
    true_positives = np.sum((predictions == 1) & (labels == 1))
    if true_positives == 0:
        return 0.0
    false_positives = np.sum((predictions == 1) & (labels != 1))
    false_negatives = np.sum((predictions != 1) & (labels == 1))
    return float(2 * true_positives / (2 * true_positives + false_positives + false_negatives))


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multi-class form, as in scikit-learn); 0.0 when undefined."""
    classes, index = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    size = len(labels)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (index[:size], index[size:]), 1)
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    correct = np.trace(confusion)
    covariance = correct * size - true_counts @ predicted_counts
    denominator = np.sqrt((size ** 2 - predicted_counts @ predicted_counts)
                          * (size ** 2 - true_counts @ true_counts))
    return 0.0 if denominator == 0 else float(covariance / denominator)


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined)."""
    x = predictions.astype(np.float64) - predictions.mean()
    y = labels.astype(np.float64) - labels.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denominator == 0 else float((x @ y) / denominator)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    return (ends - (counts - 1) / 2)[inverse]


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation, ties given their average rank; 0.0 when undefined."""
    return pearson(_average_ranks(predictions), _average_ranks(labels))


_METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
