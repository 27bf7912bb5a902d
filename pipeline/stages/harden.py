"""Stage harden: the trained gate logits become a mask of exactly K heads, scored on the dev set."""
from __future__ import annotations

import json

import torch

from pipeline.config import RunConfig
from pipeline.evaluation import evaluate_torch, load_task_data
from pipeline.gates import add_fixed_mask_, harden, kept_heads_from_mask
from pipeline.models import load_tokenizer
from pipeline.run import write_json_atomic
from pipeline.surgery import load_pruned


def run(cfg: RunConfig, run_dir, out):
    torch.set_num_threads(cfg.threads)
    gates = json.loads((run_dir / "finetune" / "gates.json").read_text())
    logits = torch.tensor(gates["logits"], dtype=torch.float64)
    mask = harden(logits, cfg.prune.keep, per_layer=cfg.prune.per_layer)
    kept = kept_heads_from_mask(mask)
    if int(mask.sum()) != cfg.prune.keep:  # exact K is the method's promise; never ship otherwise
        raise AssertionError(f"hardened mask keeps {int(mask.sum())} heads, not {cfg.prune.keep}")

    model = load_pruned(run_dir / "finetune" / "gated")
    add_fixed_mask_(model, mask)
    task_data = load_task_data(cfg, load_tokenizer(cfg.model))
    metrics = evaluate_torch(model, task_data)
    write_json_atomic(out / "mask.json", {
        "keep": cfg.prune.keep,
        "per_layer": cfg.prune.per_layer,
        "kept_heads": {str(k): v for k, v in kept.items()},
        "mask": mask.int().tolist(),
    })
    write_json_atomic(out / "metrics.json", {"hardened": metrics})
    return {"heads_kept": int(mask.sum()), "per_layer": [len(v) for v in kept.values()]}
