"""Stage finetune: the unpruned reference, then ``prune.method`` chooses exactly K heads.

Trained methods (dsp, ste, hardconcrete) train gates, jointly with the weights or on the frozen
reference; scored methods (michel, michel-iterative, random) rank heads of the reference.

Outputs: ``baseline/`` (the fine-tuned reference checkpoint), ``gated/`` (the weights trained
with gates), ``gates.json`` (logits and schedule), ``metrics.json``, ``train_log.json``.

Launched as N processes (``torchrun --nproc_per_node N -m pipeline.cli finetune RUN``, or
``accelerate launch``), both trainings run data-parallel (:mod:`pipeline.distributed`) with
``finetune.batch_size`` as the effective batch; rank 0 alone evaluates and writes the outputs
(the other ranks get ``out=None``), and the hardened mask is checked equal on every rank.
"""
from __future__ import annotations

import copy
import json

import torch

from pipeline import data
from pipeline.config import RunConfig
from pipeline.distributed import (
    Distributed,
    barrier,
    check_same_on_every_rank,
    launched,
    per_rank_batch_size,
    process_group,
    rank_seed,
    seed_gate_noise_,
)
from pipeline.evaluation import evaluate_torch, load_task_data
from pipeline.architectures import feed_forward_parts
from pipeline.methods import SCORED_METHODS, FfnBudget, select_heads
from pipeline.models import load_classifier, load_tokenizer
from pipeline.run import write_json_atomic
from pipeline.surgery import save_pruned
from pipeline.training import add_distillation_, linear_warmup_decay, steps_for, train


def _plain_finetune(model, encoded, cfg: RunConfig, dist: Distributed):
    ft = cfg.finetune
    steps = steps_for(ft.epochs, len(encoded.labels), ft.batch_size)
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ft.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=ft.lr
    )
    scheduler = linear_warmup_decay(optimizer, steps, int(ft.warmup_ratio * steps))
    return train(
        model,
        lambda epoch: data.batches(encoded, ft.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch),
        steps=steps, optimizer=optimizer, scheduler=scheduler, description="finetune", distributed=dist,
    )


def _select_heads(model, encoded, cfg: RunConfig, dist: Distributed):
    """Run ``prune.method`` on ``model``; trained methods train their gates (and, joint, the weights).

    In a multi-process launch trained methods train data-parallel with per-rank gate noise; scored
    methods run on rank 0 alone (the other ranks return None: they write nothing).

    Returns the :class:`pipeline.methods.Selection` and the training result (None for scored methods).
    """
    pr, ft = cfg.prune, cfg.finetune
    if pr.method in SCORED_METHODS and not dist.is_main:
        return None, None
    steps = steps_for(pr.epochs, len(encoded.labels), ft.batch_size)

    def batches(epoch):
        return data.batches(encoded, ft.batch_size, shuffle=True, seed=cfg.seed * 1000 + 500 + epoch)

    options = {}
    if pr.method in ("dsp", "ste"):
        options = {"temperature_start": pr.temperature_start, "temperature_end": pr.temperature_end,
                   "cooldown_steps": max(1, int(pr.cooldown_fraction * steps))}
    trained = {}

    def train_gates(model, gates):
        if dist.enabled:
            seed_gate_noise_(gates, cfg.seed + 1, dist)
        groups = [{"params": list(gates.parameters()), "lr": pr.effective_gate_lr, "weight_decay": 0.0}]
        weights = [p for n, p in model.named_parameters() if not n.startswith("head_gates.")]
        if pr.mode == "joint":
            groups.append({"params": weights, "lr": pr.lr, "weight_decay": ft.weight_decay})
        else:
            for p in weights:
                p.requires_grad_(False)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)

        # The weights' learning rate decays linearly; the gates keep theirs, as in the paper's code.
        def weight_factor(step):
            return max(0.0, (steps - step) / steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda step: 1.0] + ([weight_factor] if pr.mode == "joint" else [])
        )

        def on_step(step):
            gates.step = step

        try:
            trained["run"] = train(model, batches, steps=steps, optimizer=optimizer, scheduler=scheduler,
                                   on_step=on_step, description=f"gates ({pr.method})", distributed=dist)
        finally:
            for p in weights:
                p.requires_grad_(True)

    selection = select_heads(pr.method, model, pr.keep, per_layer=pr.per_layer, seed=cfg.seed,
                             train_gates=train_gates, batches_fn=batches, ffn=ffn_budget(cfg, model), **options)
    return selection, trained.get("run")


def ffn_budget(cfg: RunConfig, model) -> FfnBudget | None:
    """The feed-forward budget the config asks for, in blocks of ``model``; None for heads only."""
    pr = cfg.prune
    if pr.flops_keep_fraction is not None:
        return FfnBudget(pr.ffn.block_size, flops_keep_fraction=pr.flops_keep_fraction, seq=pr.flops_seq)
    if pr.ffn.cost_budget is not None:
        return FfnBudget(pr.ffn.block_size, unit_costs=(pr.ffn.head_cost, pr.ffn.block_cost),
                         cost_budget=pr.ffn.cost_budget, seq=pr.flops_seq)
    if pr.ffn.keep_fraction is None:
        return None
    blocks = sum(p.width for p in feed_forward_parts(model)) // pr.ffn.block_size
    return FfnBudget(pr.ffn.block_size, keep_blocks=max(1, round(pr.ffn.keep_fraction * blocks)), seq=pr.flops_seq)


def check_model_fits(cfg: RunConfig) -> None:
    """Refuse an impossible head budget or sequence length before any training time is spent."""
    from transformers import AutoConfig

    from pipeline.architectures import adapter_for
    from pipeline.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    adapter_for(config)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if cfg.prune.keep > layers * heads:
        raise ValueError(f"prune.keep: {cfg.prune.keep} exceeds the model's {layers * heads} heads ({layers} x {heads})")
    if cfg.prune.per_layer and cfg.prune.keep % layers:
        raise ValueError(f"prune.keep: {cfg.prune.keep} heads cannot be split evenly over {layers} layers (prune.per_layer)")
    width = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    if cfg.prune.prunes_ffn and width and width % cfg.prune.ffn.block_size:
        raise ValueError(f"prune.ffn.block_size: {cfg.prune.ffn.block_size} does not divide the model's "
                         f"feed-forward width {width}")
    limit = getattr(config, "max_position_embeddings", None)
    for field, value in (("data.max_seq_length", cfg.data.max_seq_length), ("bench.seqs", max(cfg.bench.seqs))):
        if limit is not None and value > limit:
            raise ValueError(f"{field}: {value} exceeds the model's max_position_embeddings ({limit})")


def run(cfg: RunConfig, run_dir, out):
    torch.set_num_threads(cfg.threads)
    check_model_fits(cfg)
    per_rank_batch_size(cfg.finetune.batch_size, launched())
    with process_group() as dist:
        summary = _finetune_and_select(cfg, out, dist)
        barrier(dist)  # the other ranks leave only once rank 0 has written every output
    return summary


def _finetune_and_select(cfg: RunConfig, out, dist: Distributed) -> dict:
    device = dist.device
    tokenizer = load_tokenizer(cfg.model)
    task_data = load_task_data(cfg, tokenizer)
    encoded = task_data.train(cfg)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = load_classifier(cfg.model, task_data.task.num_labels, task_data.task.label_names).to(device)
    gated_start = copy.deepcopy(model) if cfg.prune.init == "pretrained" else None
    if dist.rank:  # each rank its own dropout; rank 0 draws as a one-process run does
        torch.manual_seed(rank_seed(cfg.seed, dist.rank))
    baseline_run = _plain_finetune(model, encoded, cfg, dist)
    if dist.is_main:
        baseline_metrics = evaluate_torch(model, task_data)
        save_pruned(model.cpu(), out / "baseline", tokenizer)

    # Scored methods rank the heads of the fine-tuned reference, whatever prune.init says.
    scored = cfg.prune.method in SCORED_METHODS
    gated = (gated_start if gated_start is not None and not scored else model).to(device)
    distill = cfg.prune.distill
    # The fine-tuned reference teaches the gated model; the hook goes on before the gates' own.
    teacher = copy.deepcopy(model).to(device) if distill.weight > 0 and not scored else None
    hook = (add_distillation_(gated, teacher, weight=distill.weight, temperature=distill.temperature)
            if teacher else None)
    torch.manual_seed(rank_seed(cfg.seed + 1, dist.rank))
    try:
        selection, gated_run = _select_heads(gated, encoded, cfg, dist)
    finally:
        if hook is not None:
            hook.remove()
    if not scored:
        check_same_on_every_rank(selection.mask, "the hardened head mask", dist)
    if not dist.is_main:
        return {}
    save_pruned(gated.cpu(), out / "gated", tokenizer)

    # harden takes the top K of these scores; the selected heads rank first whatever the method
    # (michel-iterative's mask is not the top K of one score vector).
    ranking = selection.mask.double() * 1e6
    if selection.scores is not None:
        ranking = ranking + selection.scores.double().clamp(-1e5, 1e5)
    gates_info = {
        "logits": ranking.tolist(),
        "method": cfg.prune.method,
        "info": selection.info,
        "steps": gated_run.steps if gated_run else 0,
    }
    if selection.ffn_mask is not None:
        ffn_ranking = selection.ffn_mask.double() * 1e6
        if selection.ffn_scores is not None:
            ffn_ranking = ffn_ranking + selection.ffn_scores.double().clamp(-1e5, 1e5)
        gates_info["heads_kept"] = int(selection.mask.sum())
        gates_info["ffn"] = {"block_size": cfg.prune.ffn.block_size, "blocks_kept": int(selection.ffn_mask.sum()),
                             "logits": ffn_ranking.tolist()}
    write_json_atomic(out / "gates.json", gates_info)
    metrics = {
        "task": task_data.task.name,
        "metric": task_data.task.primary_metric,
        "train_examples": len(encoded.labels),
        "eval_examples": len(task_data.dev.labels),
        "baseline": baseline_metrics,
        "baseline_train": {"steps": baseline_run.steps, "seconds": round(baseline_run.seconds, 1),
                           "final_loss": baseline_run.final_loss},
        "gated_train": {"steps": gated_run.steps, "seconds": round(gated_run.seconds, 1),
                        "final_loss": gated_run.final_loss, "seconds_per_step": gated_run.seconds / gated_run.steps}
        if gated_run else {"steps": 0},
        "device": str(device),
        "processes": dist.world_size,
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "train_log.json", {"baseline": baseline_run.log, "gated": gated_run.log if gated_run else []})
    return {"baseline_metric": baseline_metrics[task_data.task.primary_metric]}


def read_metrics(run_dir) -> dict:
    return json.loads((run_dir / "finetune" / "metrics.json").read_text())
