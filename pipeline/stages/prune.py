"""Stage prune: remove the unkept heads from the gated weights and check the result.

The pruned model must equal the hard-masked model (within 1e-4 on logits, fp32) on dev batches.
"""
from __future__ import annotations

import json

import torch

from pipeline.config import RunConfig
from pipeline.evaluation import evaluate_torch, load_task_data
from pipeline.gates import add_fixed_mask_
from pipeline.models import load_tokenizer
from pipeline.run import write_json_atomic
from pipeline.surgery import count_parameters, flops_per_token, load_pruned, prune_heads_, save_pruned
from pipeline.training import predict

PARITY_ATOL = 1e-4


def run(cfg: RunConfig, run_dir, out):
    torch.set_num_threads(cfg.threads)
    mask_info = json.loads((run_dir / "harden" / "mask.json").read_text())
    kept = {int(k): v for k, v in mask_info["kept_heads"].items()}
    tokenizer = load_tokenizer(cfg.model)
    task_data = load_task_data(cfg, tokenizer)

    masked = load_pruned(run_dir / "finetune" / "gated")
    add_fixed_mask_(masked, torch.tensor(mask_info["mask"], dtype=torch.float64))
    probe = [b for _, b in zip(range(2), task_data.dev_batches(16))]
    reference = predict(masked, probe)

    model = load_pruned(run_dir / "finetune" / "gated")
    prune_heads_(model, kept)
    diff = float(abs(predict(model, probe) - reference).max())
    if diff > PARITY_ATOL:
        raise AssertionError(f"pruned model differs from the masked model by {diff:.2e} (> {PARITY_ATOL})")
    metrics = evaluate_torch(model, task_data)
    save_pruned(model, out / "model", tokenizer)

    baseline = load_pruned(run_dir / "finetune" / "baseline")
    write_json_atomic(out / "metrics.json", {
        "pruned": metrics,
        "masked_vs_pruned_max_abs_diff": diff,
        "params": {"baseline": count_parameters(baseline), "pruned": count_parameters(model)},
        # FLOPs per token depend on the sequence length (attention scores): one count per benchmarked length.
        "flops_per_token": {name: {str(seq): flops_per_token(m, seq) for seq in sorted({128, *cfg.bench.seqs})}
                            for name, m in (("baseline", baseline), ("pruned", model))},
    })
    return {"heads_kept": sum(len(v) for v in kept.values()), "max_abs_diff": diff}
