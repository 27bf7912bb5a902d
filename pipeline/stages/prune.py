"""Stage prune: remove the unkept heads (and feed-forward neurons) from the gated weights and check the result.

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
from pipeline.surgery import (
    count_parameters,
    current_kept_ffn,
    flops_per_token,
    load_pruned,
    prune_ffn_,
    prune_heads_,
    save_pruned,
)
from pipeline.training import predict

PARITY_ATOL = 1e-4


def run(cfg: RunConfig, run_dir, out):
    torch.set_num_threads(cfg.threads)
    mask_info = json.loads((run_dir / "harden" / "mask.json").read_text())
    kept = {int(k): v for k, v in mask_info["kept_heads"].items()}
    ffn = mask_info.get("ffn")
    ffn_mask = torch.tensor(ffn["mask"], dtype=torch.float64) if ffn else None
    tokenizer = load_tokenizer(cfg.model)
    task_data = load_task_data(cfg, tokenizer)

    masked = load_pruned(run_dir / "finetune" / "gated")
    add_fixed_mask_(masked, torch.tensor(mask_info["mask"], dtype=torch.float64), ffn_mask)
    probe = [b for _, b in zip(range(2), task_data.dev_batches(16))]
    reference = predict(masked, probe)

    model = load_pruned(run_dir / "finetune" / "gated")
    prune_heads_(model, kept)
    if ffn:
        prune_ffn_(model, {int(k): v for k, v in ffn["kept_neurons"].items()})
    diff = float(abs(predict(model, probe) - reference).max())
    if diff > PARITY_ATOL:
        raise AssertionError(f"pruned model differs from the masked model by {diff:.2e} (> {PARITY_ATOL})")
    metrics = evaluate_torch(model, task_data)

    baseline = load_pruned(run_dir / "finetune" / "baseline")
    # FLOPs per token depend on the sequence length (attention scores): one count per benchmarked length.
    seqs = sorted({128, cfg.prune.flops_seq, *cfg.bench.seqs})
    flops = {name: {str(seq): flops_per_token(m, seq) for seq in seqs} for name, m in (("baseline", baseline), ("pruned", model))}
    seq = str(cfg.prune.flops_seq)
    kept_fraction = flops["pruned"][seq] / flops["baseline"][seq]
    fraction = cfg.prune.flops_keep_fraction
    if fraction is not None and kept_fraction > fraction + 1e-9:  # the budget is the method's promise
        raise AssertionError(f"pruned model keeps {kept_fraction:.4f} of the FLOPs, over prune.flops_keep_fraction {fraction}")
    ffn_cfg = cfg.prune.ffn
    if ffn_cfg.cost_budget is not None and ffn_mask is not None:
        spent = sum(map(len, kept.values())) * ffn_cfg.head_cost + float(ffn_mask.sum()) * ffn_cfg.block_cost
        if spent > ffn_cfg.cost_budget * (1 + 1e-9):
            raise AssertionError(f"kept heads and blocks cost {spent:.6g}, "
                                 f"over prune.ffn.cost_budget {ffn_cfg.cost_budget}")
    save_pruned(model, out / "model", tokenizer)
    ffn_kept = current_kept_ffn(model)
    write_json_atomic(out / "metrics.json", {
        "pruned": metrics,
        "masked_vs_pruned_max_abs_diff": diff,
        "params": {"baseline": count_parameters(baseline), "pruned": count_parameters(model)},
        "flops_per_token": flops,
        "flops_kept_fraction": {"seq": cfg.prune.flops_seq, "fraction": kept_fraction},
        "ffn_neurons_kept": [len(v) for _, v in sorted(ffn_kept.items())],
        # No heads and no feed-forward neurons: only the layer's biases and LayerNorms run.
        "layers_without_matmuls": [i for i in sorted(kept) if not kept[i] and not ffn_kept[i]],
    })
    return {"heads_kept": sum(len(v) for v in kept.values()), "max_abs_diff": diff,
            "flops_kept_fraction": round(kept_fraction, 4)}
