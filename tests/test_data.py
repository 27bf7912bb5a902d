"""Task readers, tokenization, batching and metrics in pipeline.data."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import data
from pipeline.data import DataError

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"GLUE data not found at {GLUE}")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the real GLUE dev files -------------------------------------------------------------------

@needs_glue
@pytest.mark.parametrize("folder, task, rows, segments, first_label", [
    ("SST-2", "SST-2", 872, 1, 1),
    ("CoLA", "cola", 1043, 1, 1),
    ("MRPC", "mrpc", 408, 2, 1),
    ("RTE", "RTE", 277, 2, 1),  # the first RTE dev row is not_entailment, index 1
])
def test_read_task_real_dev_files(folder, task, rows, segments, first_label):
    spec = data.task_from_config(task)
    examples = data.read_task(GLUE / folder / "dev.tsv", spec)
    assert len(examples) == rows
    assert set(examples.labels) == {0, 1}
    assert all(len(t) == segments and all(t) for t in examples.texts)
    assert examples.labels[0] == first_label
    assert examples.source == str(GLUE / folder / "dev.tsv")


@needs_glue
def test_read_task_headerless_cola_takes_sentence_column():
    examples = data.read_task(GLUE / "CoLA" / "dev.tsv", data.TASKS["cola"], max_examples=1)
    assert examples.texts == [("The sailors rode the breeze clear of the rocks.",)]


@needs_glue
def test_max_examples_takes_the_first_rows():
    path = GLUE / "SST-2" / "dev.tsv"
    full = data.read_task(path, data.TASKS["sst2"])
    head = data.read_task(path, data.TASKS["sst2"], max_examples=5)
    assert len(head) == 5
    assert head.texts == full.texts[:5]
    assert head.labels == full.labels[:5]


# --- task specs --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("SST-2", "sst2"), ("sst2", "sst2"), ("CoLA", "cola"), ("STS-B", "stsb"), ("mnli", "mnli"),
])
def test_task_names_are_case_and_dash_insensitive(name, expected):
    assert data.task_from_config(name) is data.TASKS[expected]


def test_task_properties():
    assert data.TASKS["mrpc"].primary_metric == "accuracy"
    assert data.TASKS["cola"].primary_metric == "matthews"
    assert data.TASKS["mnli"].num_labels == 3
    assert data.TASKS["stsb"].num_labels == 1
    assert data.TASKS["stsb"].label_names is None


def test_custom_task_from_columns():
    spec = data.task_from_config("custom", ["text"], "label", ["neg", "pos"])
    assert spec == data.TaskSpec("custom", ("text",), "label", ("neg", "pos"), ("accuracy",))
    regression = data.task_from_config(None, ["a", "b"], "score")
    assert regression.num_labels == 1
    assert regression.metrics == ("pearson", "spearman")


def test_unknown_task_without_columns_is_an_error():
    with pytest.raises(DataError, match=r"'sst3' is not one of .*'sst2'"):
        data.task_from_config("sst3")


def test_task_spec_rejects_unknown_metric():
    with pytest.raises(DataError, match=r"metrics \['auc'\]"):
        data.task_from_config("custom", ["text"], "label", ["0", "1"], metrics=["auc"])


# --- generic tables ----------------------------------------------------------------------------

def test_read_table_csv_honours_quotes(tmp_path):
    path = write(tmp_path / "d.csv", 'id,text,label\n1,"good, really",pos\n2,bad,neg\n')
    examples = data.read_table(path, ["text"], "label", ["neg", "pos"])
    assert examples.texts == [("good, really",), ("bad",)]
    assert examples.labels == [1, 0]


def test_read_table_tsv_ignores_quotes(tmp_path):
    # An unbalanced quote (as in MRPC) must not swallow the following lines.
    path = write(tmp_path / "d.tsv", 'a\tb\tlabel\n"open quote\tx\t1\nplain\ty\t0\n')
    examples = data.read_table(path, ["a", "b"], "label", ["0", "1"])
    assert examples.texts == [('"open quote', "x"), ("plain", "y")]
    assert examples.labels == [1, 0]


def test_read_table_jsonl_with_numeric_and_regression_labels(tmp_path):
    rows = [{"q": "one", "label": 1}, {"q": "two", "label": 0}, {"q": "three", "label": 1}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = data.read_table(path, ["q"], "label", ["0", "1"], max_examples=2)
    assert examples.texts == [("one",), ("two",)]
    assert examples.labels == [1, 0]
    scores = data.read_table(path, ["q"], "label", None)
    assert scores.labels == [1.0, 0.0, 1.0]
    assert all(isinstance(v, float) for v in scores.labels)


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes("\ufeffsentence\tlabel\nhi\t1\n".encode("utf-8"))
    assert data.read_task(path, data.TASKS["sst2"]).texts == [("hi",)]


# --- DataError cases ---------------------------------------------------------------------------

def test_wrong_column_count_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\ntoo\tmany\t0\n")
    with pytest.raises(DataError) as err:
        data.read_task(path, data.TASKS["sst2"])
    assert str(err.value) == f"{path} line 3: expected 2 columns, found 3"


def test_headerless_wrong_column_count(tmp_path):
    path = write(tmp_path / "cola.tsv", "src\t1\t\tgood.\nsrc\t0\tbad.\n")
    with pytest.raises(DataError, match=r"cola\.tsv line 2: expected 4 columns, found 3"):
        data.read_task(path, data.TASKS["cola"])


def test_unknown_label_names_file_line_and_value(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\nhmm\tmaybe\n")
    with pytest.raises(DataError) as err:
        data.read_task(path, data.TASKS["sst2"])
    assert str(err.value) == f"{path} line 3: label 'maybe' not in ['0', '1']"
    assert "\n" not in str(err.value)


def test_non_numeric_regression_label(tmp_path):
    path = write(tmp_path / "sts.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n")
    with pytest.raises(DataError, match=r"sts\.tsv line 2: label 'high' is not a number"):
        data.read_task(path, data.TASKS["stsb"])


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n", "\n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = write(tmp_path / "empty.tsv", content)
    with pytest.raises(DataError, match=rf"^{path}: no examples$"):
        data.read_task(path, data.TASKS["sst2"])


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path / "d.csv", "text,target\nhi,1\n")
    with pytest.raises(DataError) as err:
        data.read_table(path, ["text"], "label", ["0", "1"])
    assert str(err.value) == f"{path} line 2: no column 'label' (columns: ['text', 'target'])"


def test_missing_jsonl_field_is_named(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: no column 'label'"):
        data.read_table(path, ["text"], "label", ["0", "1"])


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.tsv"
    with pytest.raises(DataError, match=rf"^{path}: no such file$"):
        data.read_task(path, data.TASKS["sst2"])


def test_unsupported_extension(tmp_path):
    path = write(tmp_path / "d.parquet", "")
    with pytest.raises(DataError, match=r"unsupported extension '\.parquet'"):
        data.read_table(path, ["text"], "label", None)


# --- metrics -----------------------------------------------------------------------------------

def test_binary_metrics_by_hand():
    labels = [1, 1, 1, 1, 0, 0]
    predictions = [1, 1, 1, 0, 0, 1]
    # TP=3 FN=1 TN=1 FP=1.
    # accuracy = 4/6; F1 = 2*3 / (2*3 + 1 + 1) = 0.75;
    # Matthews = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #          = (3*1 - 1*1) / sqrt(4*4*2*2) = 2/8 = 0.25.
    spec = data.TaskSpec("t", ("s",), "l", ("0", "1"), ("accuracy", "f1", "matthews"))
    scores = data.compute_metrics(spec, predictions, labels)
    assert scores == pytest.approx({"accuracy": 4 / 6, "f1": 0.75, "matthews": 0.25})
    assert list(scores) == ["accuracy", "f1", "matthews"]


def test_matthews_and_f1_when_undefined():
    spec = data.TaskSpec("t", ("s",), "l", ("0", "1"), ("matthews", "f1"))
    assert data.compute_metrics(spec, [0, 0, 0], [0, 1, 1]) == {"matthews": 0.0, "f1": 0.0}


def test_matthews_perfect_and_inverted():
    assert data.matthews(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0])) == 1.0
    inverted = data.compute_metrics(data.TASKS["cola"], [1, 0, 0, 1], [0, 1, 1, 0])
    assert inverted == {"matthews": -1.0}


def test_correlations_by_hand():
    # x - mean = [-1, 0, 1]; y - mean = [-7/3, -1/3, 8/3]; r = 5 / sqrt(2 * 114/9).
    scores = data.compute_metrics(data.TASKS["stsb"], [1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
    assert scores["pearson"] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert scores["spearman"] == pytest.approx(1.0)


def test_spearman_gives_ties_their_average_rank():
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5).
    scores = data.compute_metrics(data.TASKS["stsb"], [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert scores["spearman"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_metrics_reject_misaligned_inputs():
    with pytest.raises(ValueError, match="equal-length"):
        data.compute_metrics(data.TASKS["sst2"], [0, 1], [0, 1, 1])


# --- encoding ----------------------------------------------------------------------------------

def test_encode_single_and_pair(tokenizer):
    single = data.Examples([("a good film",), ("bad",)], [1, 0], "mem")
    encoded = data.encode(tokenizer, single, max_length=16)
    assert encoded.labels == [1, 0]
    assert encoded.input_ids[0][0] == tokenizer.cls_token_id
    assert encoded.input_ids[0][-1] == tokenizer.sep_token_id
    assert encoded.input_ids[0] == tokenizer("a good film")["input_ids"]
    assert set(encoded.token_type_ids[0]) == {0}

    pair = data.Examples([("the cat sat", "a cat sat")], [0], "mem")
    encoded_pair = data.encode(tokenizer, pair, max_length=16)
    ids, types = encoded_pair.input_ids[0], encoded_pair.token_type_ids[0]
    assert len(types) == len(ids)
    assert ids.count(tokenizer.sep_token_id) == 2
    assert types[0] == 0 and types[-1] == 1


def test_encode_truncates_to_max_length(tokenizer):
    long = data.Examples([("word " * 100, "other " * 100)], [0], "mem")
    encoded = data.encode(tokenizer, long, max_length=12)
    assert len(encoded.input_ids[0]) == 12
    assert encoded.input_ids[0][-1] == tokenizer.sep_token_id


def test_fixed_length_batch_shape_and_cycling(tokenizer):
    examples = data.Examples([("short",), ("word " * 50,)], [0, 1], "mem")
    batch = data.fixed_length_batch(tokenizer, examples, batch=5, seq=9)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    for tensor in batch.values():
        assert tensor.shape == (5, 9) and tensor.dtype == torch.int64
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][2])  # cycled
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # [CLS] short [SEP]
    assert batch["attention_mask"][1].all()  # truncated to exactly seq


# --- batching ----------------------------------------------------------------------------------

def make_encoded(count: int, regression: bool = False) -> data.Encoded:
    """Example i has i % 7 + 2 tokens, all 100 + i, so a batch shows which examples it holds."""
    ids = [[100 + i] * (i % 7 + 2) for i in range(count)]
    types = [[0] * (len(x) - 1) + [1] for x in ids]
    labels = [float(i) / 2 for i in range(count)] if regression else [i % 3 for i in range(count)]
    return data.Encoded(ids, types, labels)


def example_ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 100).tolist()


def test_batches_pad_to_longest_with_mask():
    encoded = make_encoded(3)  # lengths 2, 3, 4
    (batch,) = data.batches(encoded, 8, shuffle=False)
    assert batch["input_ids"].tolist() == [[100, 100, 0, 0], [101, 101, 101, 0], [102] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [0, 1, 2]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_regression_labels_are_float32():
    (batch,) = data.batches(make_encoded(3, regression=True), 4, shuffle=True)
    assert batch["labels"].dtype == torch.float32


def test_unshuffled_batches_keep_file_order():
    encoded = make_encoded(23)
    sizes = [len(b["labels"]) for b in data.batches(encoded, 5, shuffle=False)]
    order = [i for b in data.batches(encoded, 5, shuffle=False) for i in example_ids(b)]
    assert sizes == [5, 5, 5, 5, 3]
    assert order == list(range(23))


@pytest.mark.parametrize("bucket", [True, False])
def test_shuffled_epoch_has_every_example_once_and_is_seeded(bucket):
    encoded = make_encoded(1000)

    def epoch(seed):
        epoch_batches = data.batches(encoded, 8, shuffle=True, seed=seed, bucket=bucket)
        return [example_ids(b) for b in epoch_batches]

    batches = list(data.batches(encoded, 8, shuffle=True, seed=3, bucket=bucket))
    for batch in batches:  # labels travel with their examples
        assert batch["labels"].tolist() == [i % 3 for i in example_ids(batch)]
    first = epoch(3)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert epoch(3) == first
    assert epoch(4) != first
    assert [i for b in first for i in b] != list(range(1000))


def test_bucketing_reduces_padding():
    encoded = make_encoded(1000)

    def padding(bucket):
        return sum(int((b["attention_mask"] == 0).sum())
                   for b in data.batches(encoded, 8, shuffle=True, seed=0, bucket=bucket))

    assert padding(bucket=True) < padding(bucket=False) / 4


def test_batches_leave_global_random_state_alone():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    list(data.batches(make_encoded(50), 4, shuffle=True, seed=9))
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == before
