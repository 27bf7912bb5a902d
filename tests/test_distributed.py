"""Data-parallel gated fine-tuning: real 2-process gloo runs on the CPU against one-process runs.

The launch tests start real process groups (gloo over the loopback): one spawned through
torch.multiprocessing at the library level, one through ``torchrun`` on the ``dsprune finetune``
command. Together they take about a minute here (2 shared cores).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import NO_NETWORK, ROOT, make_tiny_bert, run_cli, silence_heads_
from pipeline.distributed import Distributed, per_rank_batch_size, rank_seed, seed_gate_noise_, shard
from pipeline.gates import GateConfig, add_head_gates_

# ------------------------------------------------------------------ one process: sharding and seeds


def test_shards_cover_the_batch_and_their_weights_give_the_global_mean():
    losses = torch.arange(13, dtype=torch.float64) ** 2  # an epoch's last batch: 13 rows over 4 ranks
    batch = {"labels": torch.arange(13), "input_ids": torch.arange(26).view(13, 2)}
    rows, weighted = [], []
    for rank in range(4):
        part, weight = shard(batch, Distributed(rank, 4))
        rows += part["labels"].tolist()
        assert torch.equal(part["input_ids"][:, 0], 2 * part["labels"])
        weighted.append(losses[part["labels"]].mean() * weight)
    assert rows == list(range(13))  # disjoint, complete, in order
    # DistributedDataParallel averages over ranks: the weighted average is the 13-row mean.
    assert (sum(weighted) / 4).item() == pytest.approx(losses.mean().item(), rel=1e-12)


def test_a_rank_without_rows_joins_with_weight_zero():
    batch = {"labels": torch.tensor([5, 6])}
    parts = [shard(batch, Distributed(rank, 3)) for rank in range(3)]
    assert [p["labels"].tolist() for p, _ in parts] == [[5], [6], [5]]
    assert [w for _, w in parts] == [1.5, 1.5, 0.0]


def test_the_effective_batch_must_split_over_the_processes():
    assert per_rank_batch_size(32, Distributed(1, 4)) == 8
    with pytest.raises(ValueError, match=r"finetune.batch_size: 30 is not divisible by the 4 processes"):
        per_rank_batch_size(30, Distributed(0, 4))


def test_each_rank_draws_its_own_reproducible_noise():
    assert rank_seed(7, 0) == 7  # rank 0 repeats a one-process run
    seeds = [rank_seed(7, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rank_seed(7, rank) for rank in range(4)]
    samples = []
    for rank in (0, 1, 1):
        gates = add_head_gates_(make_tiny_bert(), GateConfig(keep=3), seed=7).train()
        seed_gate_noise_(gates, 8, Distributed(rank, 2))
        samples.append(gates.compute_mask())
    one_process = add_head_gates_(make_tiny_bert(), GateConfig(keep=3), seed=7).train().compute_mask()
    assert torch.equal(samples[0], one_process)
    assert not torch.allclose(samples[0], samples[1])
    assert torch.equal(samples[1], samples[2])


# ------------------------------------------------------------------ two gloo processes, library level


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_batches():
    """An epoch of 21 examples in batches of 8, 8 and 5 (the last splits 3 + 2 over two ranks)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (8, 8, 5):
        ids = torch.randint(1000, 1200, (n, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 2, (n,), generator=g)})
    return out


def _train_tiny(dist: Distributed) -> dict:
    """Plain fine-tuning, then straight-through gates with the weights (deterministic: no noise, no dropout)."""
    from pipeline.training import train

    model = make_tiny_bert()
    batches = _fixed_batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, lambda epoch: batches, steps=6, optimizer=optimizer, distributed=dist, progress=False)
    gates = add_head_gates_(model, GateConfig(keep=3, method="ste"))
    weights = [p for n, p in model.named_parameters() if not n.startswith("head_gates.")]
    optimizer = torch.optim.AdamW([{"params": list(gates.parameters()), "lr": 0.05, "weight_decay": 0.0},
                                   {"params": weights, "lr": 1e-3}])
    run = train(model, lambda epoch: batches, steps=6, optimizer=optimizer, distributed=dist, log_every=1,
                progress=False)
    return {"logits": gates.logits.detach().clone(), "mask": gates.hardened(),
            "classifier": model.classifier.weight.detach().clone(), "losses": [row["loss"] for row in run.log]}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from pipeline.distributed import check_same_on_every_rank, process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group() as dist:
        result = _train_tiny(dist)
        check_same_on_every_rank(result["logits"], "gate logits", dist)
        try:
            check_same_on_every_rank(torch.tensor([rank]), "the rank", dist)
            result["out_of_sync"] = None
        except RuntimeError as err:
            result["out_of_sync"] = str(err)
        if dist.is_main:
            torch.save(result, os.path.join(out_dir, "ddp.pt"))


def test_two_gloo_processes_train_as_one_with_the_same_effective_batch(tmp_path):
    import torch.multiprocessing as mp

    start = time.perf_counter()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train_tiny(Distributed())
    finally:
        torch.set_num_threads(threads)
    print(f"2-process run {time.perf_counter() - start:.1f}s; max logit difference "
          f"{(ddp['logits'] - single['logits']).abs().max().item():.2e}")
    # Only the order of float32 sums differs (two half-batch means averaged against one mean).
    assert torch.allclose(ddp["logits"], single["logits"], rtol=0, atol=1e-5)
    assert torch.allclose(ddp["classifier"], single["classifier"], rtol=0, atol=1e-5)
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert torch.equal(ddp["mask"], single["mask"])
    assert "differs between rank 0 and rank(s) [1]" in ddp["out_of_sync"]


# ------------------------------------------------------------------ torchrun on the finetune stage

# A planted task in words: label 1 when "apple" occurs. After pre-training, every head but these two
# has zero value weights (as in tests/test_methods.py), so only they carry the signal and any
# correct head selection keeps exactly them, whatever the Gumbel noise of each rank.
WORDS = "apple river stone cloud green table music paper horse light".split()
PLANTED = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)


def _planted_sentences(count: int, seed: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g)]
        rows.append((" ".join(words), int("apple" in words)))
    return rows


def _write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))


@pytest.fixture(scope="module")
def planted_run_config(tmp_path_factory, tokenizer):
    """A run config over a tiny BERT that has learned the planted task through the two planted heads."""
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.gates import add_fixed_mask_

    folder = tmp_path_factory.mktemp("planted")
    train_rows, dev_rows = _planted_sentences(480, 0), _planted_sentences(96, 1)
    _write_tsv(folder / "train.tsv", train_rows)
    _write_tsv(folder / "dev.tsv", dev_rows)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    handles = add_fixed_mask_(model, PLANTED.float())

    def encode(rows):
        enc = tokenizer([text for text, _ in rows], return_tensors="pt")  # every sentence is 8 tokens
        return {**enc, "labels": torch.tensor([label for _, label in rows])}

    train, dev = encode(train_rows), encode(dev_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        rows = torch.arange(32) + 32 * (step % 15)
        model(**{k: v[rows] for k, v in train.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for handle in handles:
        handle.remove()
    silence_heads_(model, PLANTED)
    model.eval()
    with torch.no_grad():
        accuracy = (model(**dev).logits.argmax(-1) == dev["labels"]).float().mean().item()
    torch.set_num_threads(threads)
    assert accuracy > 0.95  # the planted heads carry the task
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return {
        "seed": 0,
        "threads": 1,
        "model": {"name": str(folder / "model")},
        "data": {"task": "sst2", "train": str(folder / "train.tsv"), "dev": str(folder / "dev.tsv"),
                 "max_seq_length": 16},
        # The reference fine-tuning must leave the planted model as it is: a negligible learning rate.
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-9},
        # Pipelined DSP: the gates alone learn, 120 steps, the temperature falling over the first 60.
        "prune": {"method": "dsp", "mode": "pipelined", "keep": 2, "epochs": 4, "gate_lr": 0.5,
                  "cooldown_fraction": 0.5},
        "bench": {"seqs": [16]},
    }


def _run_folder(config: dict, path):
    from pipeline.config import config_from_dict
    from pipeline.run import prepare_run_folder

    return prepare_run_folder(config_from_dict({**config, "run_dir": str(path)})).path


def _torchrun(*args, processes: int = 2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DSPRUNE_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(NO_NETWORK), str(ROOT)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "pipeline.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_torchrun_finetune_on_two_gloo_processes_keeps_the_one_process_mask(planted_run_config, tmp_path):
    from pipeline.gates import harden

    start = time.perf_counter()
    two = _run_folder(planted_run_config, tmp_path / "two")
    one = _run_folder(planted_run_config, tmp_path / "one")
    launch = _torchrun("finetune", str(two))
    single = run_cli("finetune", str(one), timeout=300)
    stdout, stderr = launch.communicate(timeout=300)
    print(f"torchrun (2 processes) and one process side by side: {time.perf_counter() - start:.1f}s")
    assert single.returncode == 0, single.stderr[-3000:]
    assert launch.returncode == 0, stderr[-3000:]

    masks, logits = {}, {}
    for run_dir, processes in ((one, 1), (two, 2)):
        gates = json.loads((run_dir / "finetune" / "gates.json").read_text())
        logits[processes] = torch.tensor(gates["logits"])
        masks[processes] = harden(logits[processes], 2)
        metrics = json.loads((run_dir / "finetune" / "metrics.json").read_text())
        assert metrics["processes"] == processes
        assert metrics["gated_train"]["steps"] == 120  # the same global steps: the effective batch is 16
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert list(manifest["stages"]) == ["finetune"]
    assert torch.equal(masks[1], PLANTED), masks[1].int().tolist()
    assert torch.equal(masks[2], masks[1]), masks[2].int().tolist()
    # Rank 1 drew its own Gumbel noise: with rank 0's noise on both ranks, the logits would repeat
    # the one-process run's up to float rounding (as the straight-through run above shows).
    assert not torch.allclose(logits[2], logits[1], rtol=0, atol=1e-2)
    # Rank 0 alone wrote: the same files as one process, no stray temporary folder, one stage line.
    assert _files(two) == _files(one)
    assert stderr.count("[finetune] done") == 1, stderr[-3000:]
