"""Data-parallel gated fine-tuning: real 2-process gloo runs on the CPU against one-process runs.

The launch test starts a real process group (gloo over the loopback), spawned through
torch.multiprocessing at the library level.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from conftest import make_tiny_bert
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

