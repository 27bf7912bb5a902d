"""Stage harden: the trained gate logits become a mask of exactly K heads (and, when feed-forward
blocks were selected too, of exactly the blocks the method kept), scored on the dev set."""
from __future__ import annotations

import json

import torch

from pipeline.config import RunConfig
from pipeline.evaluation import evaluate_torch, load_task_data
from pipeline.gates import add_fixed_mask_, harden, kept_heads_from_mask, kept_neurons_from_mask
from pipeline.models import load_tokenizer
from pipeline.run import write_json_atomic
from pipeline.surgery import load_pruned


def run(cfg: RunConfig, run_dir, out):
    torch.set_num_threads(cfg.threads)
    gates = json.loads((run_dir / "finetune" / "gates.json").read_text())
    logits = torch.tensor(gates["logits"], dtype=torch.float64)
    # A feed-forward budget decides the head count itself (one FLOP budget) or beside it; the
    # finetune stage recorded the counts its selection kept, and the rankings put those units first.
    keep = gates.get("heads_kept", cfg.prune.keep)
    mask = harden(logits, keep, per_layer=cfg.prune.per_layer) if keep else torch.zeros_like(logits, dtype=torch.bool)
    kept = kept_heads_from_mask(mask)
    if int(mask.sum()) != keep:  # exact K is the method's promise; never ship otherwise
        raise AssertionError(f"hardened mask keeps {int(mask.sum())} heads, not {keep}")
    ffn_mask = None
    record = {
        "keep": keep,
        "per_layer": cfg.prune.per_layer,
        "kept_heads": {str(k): v for k, v in kept.items()},
        "mask": mask.int().tolist(),
    }
    if "ffn" in gates:
        ffn = gates["ffn"]
        ffn_logits = torch.tensor(ffn["logits"], dtype=torch.float64)
        blocks = ffn["blocks_kept"]
        ffn_mask = harden(ffn_logits, blocks) if blocks else torch.zeros_like(ffn_logits, dtype=torch.bool)
        record["ffn"] = {
            "block_size": ffn["block_size"],
            "blocks_kept": blocks,
            "mask": ffn_mask.int().tolist(),
            "kept_neurons": {str(k): v for k, v in kept_neurons_from_mask(ffn_mask, ffn["block_size"]).items()},
        }

    model = load_pruned(run_dir / "finetune" / "gated")
    add_fixed_mask_(model, mask, ffn_mask)
    task_data = load_task_data(cfg, load_tokenizer(cfg.model))
    metrics = evaluate_torch(model, task_data)
    write_json_atomic(out / "mask.json", record)
    write_json_atomic(out / "metrics.json", {"hardened": metrics})
    summary = {"heads_kept": int(mask.sum()), "per_layer": [len(v) for v in kept.values()]}
    if ffn_mask is not None:
        summary["ffn_blocks_per_layer"] = ffn_mask.sum(1).tolist()
    return summary
