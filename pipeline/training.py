"""The training and evaluation loops shared by every stage that trains or scores a model."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distributed import Distributed, mean_over_ranks, shard, wrap
from pipeline.progress import progress_bar


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (one norm over every gradient, one scale for all), one
    device and dtype at a time.

    Gates beside a CUDA model live on the CPU (:func:`pipeline.gates.gate_device`), and DSP's gates
    are float64. Given gradients of two devices or dtypes, torch's own function (2.11) left its fast
    paths: on an H100 it scaled the CUDA gradients one kernel at a time (98 more launches per MiniLM
    step, whose training step is bound by launches), and on a CPU it stacked the per-tensor norms
    of mixed dtypes one copy at a time (600 more ops per step). Here each group keeps its fast
    paths: torch's norm of the group, and one foreach multiply. Another group's norm joins the first
    group's with one ``hypot`` (a CPU norm as a scalar argument: no copy to the device), and the
    scale, computed once as torch computes it, reaches it with one copy. Returns the total norm.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not groups:
        return torch.tensor(0.0)
    (device, dtype), *others = groups
    total = torch.nn.utils.get_total_norm(groups[device, dtype])
    for other in others:
        norm = torch.nn.utils.get_total_norm(groups[other]).to(dtype)
        total = torch.hypot(total, norm if norm.device.type == "cpu" else norm.to(device))
    scale = (max_norm / (total + 1e-6)).clamp_(max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
    for (group_device, group_dtype), grads in groups.items():
        # The scale in each group's own dtype: a float64 scale sent torch's (2.11) foreach multiply
        # of float32 CUDA gradients down its per-tensor path, one kernel per tensor: 107 more
        # launches per MiniLM step on an H100 (torch.profiler, study timing). Copied first, then
        # converted: for the CPU gates one copy and no kernel.
        torch._foreach_mul_(grads, scale.to(group_device).to(group_dtype))
    return total


def linear_warmup_decay(optimizer, total_steps: int, warmup_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    log: list[dict]


def train(
    model: nn.Module,
    epochs_of_batches: Callable[[int], Iterable[dict]],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    on_step: Callable[[int], None] | None = None,
    log_every: int = 50,
    progress: bool | None = None,
    description: str = "train",
    distributed: Distributed | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps over batches drawn epoch after epoch.

    Args:
        epochs_of_batches: called with the epoch index, returns that epoch's batches (dicts with labels).
            The model's loss must be a mean over the batch's examples.
        on_step: called with the step index before each forward (the gates' temperature follows it).
        progress: force the progress bar on or off; None shows it only on a terminal and not
            under ``--quiet`` (:func:`pipeline.progress.progress_enabled`).
        distributed: in a multi-process launch, the model trains inside DistributedDataParallel and
            each rank takes its rows of every batch (:func:`pipeline.distributed.shard`); every rank
            must be given the same batches. The logged loss is the global batch's.
    """
    if distributed is not None and not distributed.is_main:
        progress = False  # one bar per launch
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda"
    parallel = distributed is not None and distributed.enabled
    runner = wrap(model, distributed) if parallel else model
    model.train()
    log, losses = [], []
    start = time.perf_counter()
    bar = progress_bar(steps, description, enabled=progress)
    step, epoch = 0, 0
    while step < steps:
        for batch in epochs_of_batches(epoch):
            if step >= steps:
                break
            if on_step is not None:
                on_step(step)
            weight = 1.0
            if parallel:
                batch, weight = shard(batch, distributed)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = runner(**batch).loss
                if weight != 1.0:
                    loss = loss * weight
                loss.backward()
            except torch.OutOfMemoryError:
                shape = tuple(batch["input_ids"].shape)
                raise ValueError(f"{description}: a batch of shape {shape} does not fit in {device} memory; "
                                 "lower finetune.batch_size or data.max_seq_length") from None
            clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(mean_over_ranks(loss, distributed) if parallel else loss.item())
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                log.append({"step": step, "loss": float(np.mean(losses[-log_every:])),
                            "seconds": round(time.perf_counter() - start, 2)})
        epoch += 1
    bar.close()
    model.eval()
    return TrainResult(steps, time.perf_counter() - start, float(np.mean(losses[-log_every:])), log)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``temperature**2 * KL(softmax(teacher / T) || softmax(student / T))``, the mean over the batch
    (Hinton et al., 2015); mean squared error when there is one output (regression)."""
    student, teacher = student.float(), teacher.float()
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature**2


def add_distillation_(student: nn.Module, teacher: nn.Module, *, weight: float, temperature: float):
    """Mix a distillation term into ``student``'s training loss, in place; returns the hook handle.

    In training mode, every forward of ``student`` that computes a ``loss`` also runs ``teacher``
    (eval mode, no gradient) on the same inputs and replaces the loss with
    ``(1 - weight) * loss + weight * distillation_loss(...)``. Install it before gates that add a
    penalty to the loss (their hooks run after this one, so the penalty is not scaled).
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    teacher.eval().requires_grad_(False)

    def mix(module, args, kwargs, output):
        if not module.training or getattr(output, "loss", None) is None:
            return output
        inputs = {k: v for k, v in kwargs.items() if k != "labels"}
        with torch.no_grad():
            target = teacher(*args, **inputs).logits
        output.loss = (1 - weight) * output.loss + weight * distillation_loss(output.logits, target, temperature)
        return output

    return student.register_forward_hook(mix, with_kwargs=True)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict]) -> np.ndarray:
    """Logits for every batch, concatenated, in order (labels in the batches are ignored)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        out.append(model(**inputs).logits.float().cpu().numpy())
    return np.concatenate(out)


def steps_for(epochs: float, examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * math.ceil(examples / batch_size)))
