"""Every head-selection method DSP is compared with, each ending with exactly K heads.

Trained methods install a gate module as ``model.head_gates`` and learn it with the task loss:

- ``dsp``: Gumbel-soft-top-K gates (Li, Cotterell & Sachan, 2021), from :mod:`pipeline.gates`.
- ``ste``: hard top-K forward, identity backward, from :mod:`pipeline.gates`.
- ``hardconcrete``: hard-concrete gates with an expected-L0 penalty (Voita et al., 2019); the final
  K heads are the top-K gate open probabilities.

Scored methods read a trained model and need no training of their own:

- ``michel``: importance ``E|dL/dmask|`` over training batches (Michel et al., 2019), normalized per
  layer, top-K in one shot; ``michel-iterative`` removes a fraction of the heads at a time and
  re-estimates importance with the removed heads masked.
- ``random``: a seeded random K-subset.

Each method takes a global budget (K over all heads; layers come out uneven) or a per-layer one
(``keep // layers`` heads in every layer). Joint versus pipelined training (weights learning with
the gates, or frozen) is how the caller trains the gates, not a method: see :func:`select_heads`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.architectures import attention_parts, feed_forward_parts
from pipeline.gates import (
    GateConfig,
    add_head_gates_,
    add_unit_gates_,
    budget_prefix,
    flops_budget,
    harden,
    remove_head_gates_,
    gate_device,
    install_mask_hooks_,
    top_k_mask,
    unit_costs,
)
from pipeline.progress import track

TRAINED_METHODS = ("dsp", "ste", "hardconcrete")
SCORED_METHODS = ("michel", "michel-iterative", "random")
METHODS = TRAINED_METHODS + SCORED_METHODS
MODES = ("joint", "pipelined")


def check_budget(layers: int, heads: int, keep: int, per_layer: bool) -> None:
    """Raise ValueError unless exactly ``keep`` heads can be kept under this budget."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 < keep <= layers * heads:
        raise ValueError(f"keep must be an integer in 1..{layers * heads}, got {keep!r}")
    if per_layer and keep % layers:
        raise ValueError(f"a per-layer budget needs keep divisible by {layers} layers, got {keep}")


def _model_shape(model: nn.Module) -> tuple[int, int]:
    parts = attention_parts(model)
    heads = {p.num_heads for p in parts}
    if len(heads) != 1 or 0 in heads:
        raise ValueError(f"head selection needs an unpruned model, got heads {[p.num_heads for p in parts]}")
    return len(parts), heads.pop()


# --------------------------------------------------------------------------- hard concrete (Voita)


@dataclass(frozen=True)
class HardConcreteConfig:
    """Hard-concrete gates with an L0 penalty (Louizos et al., 2018; Voita et al., 2019).

    Attributes:
        keep: K, heads kept after training (top-K of the gate open probabilities).
        penalty: lambda, the coefficient of the expected L0 norm added to the task loss
            (the reference code's ``l0_penalty`` default is 0.5).
        temperature: the concrete distribution's temperature (0.33 in the reference code).
        stretch: the interval the sigmoid is stretched to before clipping to [0, 1].
        per_layer: keep ``keep // layers`` heads in every layer.
        eps: keeps the uniform noise and the open probability away from 0 and 1.
        penalty_warmup_steps: the penalty grows linearly from 0 over this many steps (0: full from
            the start), so the classifier can learn before the penalty pulls the gates shut. (On
            SST-2 from the pretrained model it did not prevent the collapse at gate learning rate
            0.1; a rate of 0.001 did.)
    """

    keep: int
    penalty: float = 0.5
    temperature: float = 0.33
    stretch: tuple[float, float] = (-0.1, 1.1)
    per_layer: bool = False
    eps: float = 1e-6
    penalty_warmup_steps: int = 0

    def __post_init__(self):
        errors = []
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep <= 0:
            errors.append(f"keep must be a positive integer, got {self.keep!r}")
        if self.penalty < 0:
            errors.append(f"penalty must be >= 0, got {self.penalty}")
        if self.penalty_warmup_steps < 0:
            errors.append(f"penalty_warmup_steps must be >= 0, got {self.penalty_warmup_steps}")
        if not 0 < self.temperature <= 1:
            errors.append(f"temperature must be in (0, 1], got {self.temperature}")
        low, high = self.stretch
        if not (low < 0 and high > 1):
            errors.append(f"stretch must be (low < 0, high > 1) for the L0 penalty, got {self.stretch}")
        if errors:
            raise ValueError("; ".join(errors))

    def to_dict(self) -> dict:
        return asdict(self)


class HardConcreteGates(nn.Module):
    """One ``log_a`` per head; a stretched, clipped concrete sample scales each head while training.

    Eval mode uses the deterministic gate ``clip(sigmoid(log_a) * (high - low) + low, 0, 1)``, as the
    reference code does. The expected L0 norm is ``sum_h P(gate_h != 0)``.
    """

    def __init__(self, num_layers: int, num_heads: int, config: HardConcreteConfig, seed: int = 0):
        super().__init__()
        check_budget(num_layers, num_heads, config.keep, config.per_layer)
        self.config = config
        self.log_a = nn.Parameter(torch.empty(num_layers, num_heads))
        # The reference gives each layer a [1, heads, 1, 1] gate initialised Xavier-uniform:
        # fan_in = heads, fan_out = 1.
        bound = math.sqrt(6.0 / (num_heads + 1))
        with torch.no_grad():
            self.log_a.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
        self.step = 0
        self.noise_generator = torch.Generator().manual_seed(seed + 1)
        self.mask: torch.Tensor | None = None
        self._hooks: list = []

    def deterministic_gates(self) -> torch.Tensor:
        low, high = self.config.stretch
        return torch.clamp(torch.sigmoid(self.log_a) * (high - low) + low, 0, 1)

    def compute_mask(self) -> torch.Tensor:
        if not self.training:
            return self.deterministic_gates()
        cfg = self.config
        low, high = cfg.stretch
        # Noise is drawn on the CPU generator so a seed gives the same gates on any device.
        u = torch.rand(self.log_a.shape, generator=self.noise_generator) * (1 - 2 * cfg.eps) + cfg.eps
        u = u.to(self.log_a.device)
        concrete = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_a) / cfg.temperature)
        return torch.clamp(concrete * (high - low) + low, 0, 1)

    def open_probability(self) -> torch.Tensor:
        """P(gate != 0) per head: the CDF of the stretched concrete above 0."""
        cfg = self.config
        low, high = cfg.stretch
        p_open = torch.sigmoid(self.log_a - cfg.temperature * math.log(-low / high))
        return torch.clamp(p_open, cfg.eps, 1 - cfg.eps)

    def penalty(self) -> torch.Tensor:
        """lambda * expected L0 norm, the term added to the task loss while training (scaled by
        ``step / penalty_warmup_steps`` during the warm-up)."""
        warmup = self.config.penalty_warmup_steps
        scale = min(1.0, self.step / warmup) if warmup else 1.0
        return self.config.penalty * scale * self.open_probability().sum()

    def hardened(self) -> torch.Tensor:
        """Exactly K heads: the top-K open probabilities (monotone in ``log_a``, so ties are rare)."""
        return harden(self.open_probability().detach(), self.config.keep, per_layer=self.config.per_layer)

    def penalty_keeps(self) -> int:
        """How many heads the penalty alone leaves open: deterministic gate > 0.5, as the reference counts."""
        return int((self.deterministic_gates().detach() > 0.5).sum())


def add_hardconcrete_gates_(model: nn.Module, config: HardConcreteConfig, seed: int = 0) -> HardConcreteGates:
    """Install hard-concrete gates on ``model`` in place (as ``model.head_gates``) and return them.

    In training mode the gates' :meth:`~HardConcreteGates.penalty` is added to the model output's
    ``loss``, so any loop that minimizes ``model(**batch).loss`` minimizes the reference objective
    (task loss + lambda * expected L0). ``pipeline.gates.remove_head_gates_`` takes them off.
    """
    if hasattr(model, "head_gates"):
        raise ValueError("model already has head gates")
    layers, heads = _model_shape(model)
    gates = HardConcreteGates(layers, heads, config, seed=seed).to(gate_device(model))
    model.head_gates = gates

    def refresh():
        gates.mask = gates.compute_mask()

    def add_penalty(module, args, kwargs, output):
        if module.training and getattr(output, "loss", None) is not None:
            output.loss = output.loss + gates.penalty().to(output.loss)  # device and dtype
        return output

    gates._hooks.append(model.register_forward_hook(add_penalty, with_kwargs=True))
    gates._hooks += install_mask_hooks_(model, lambda: gates.mask, refresh=refresh)
    return gates


# --------------------------------------------------------------------------- Michel et al.


def _add_grad_mask_(model: nn.Module, mask: torch.Tensor) -> list:
    return install_mask_hooks_(model, lambda: mask)


def michel_importance(model: nn.Module, batches: Iterable[dict], mask: torch.Tensor | None = None, *,
                      normalize_layers: bool = True) -> torch.Tensor:
    """Head importance ``sum |dL/dmask_h|`` over ``batches``, divided by their token count.

    Follows Michel et al. (2019) and the reference code: dropout off, a mask of ones (or ``mask``,
    with pruned heads at 0) that requires grad, then each layer's scores divided by their L2 norm
    and all scores min-max scaled to [0, 1] (the last step does not change the ranking).

    Args:
        model: a model with labels in its batches; not modified.
        batches: dicts with ``labels`` (and ``attention_mask`` for the token count).
        mask: (layers, heads) 0/1 mask of heads still in the model; ones when None.
        normalize_layers: divide each layer's scores by the layer's L2 norm.

    Returns:
        float32 (layers, heads) on the CPU.
    """
    layers, heads = _model_shape(model)
    device = next(model.parameters()).device
    if mask is None:
        mask = torch.ones(layers, heads)
    leaf = mask.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    importance = torch.zeros(layers, heads, dtype=torch.float64, device=device)
    tokens = 0.0
    was_training = model.training
    model.eval()
    handles = _add_grad_mask_(model, leaf)
    use_bf16 = device.type == "cuda"
    try:
        # A forward and backward per training batch: as slow as an epoch of training, so it gets a bar.
        for batch in track(batches, None, "head importance"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**batch).loss
            (grad,) = torch.autograd.grad(loss, leaf)
            importance += grad.detach().abs().double()
            tokens += float(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["labels"].numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("michel_importance needs at least one batch")
    importance = importance / tokens
    if normalize_layers:
        importance = importance / (importance.norm(p=2, dim=-1, keepdim=True) + 1e-20)
    span = importance.max() - importance.min()
    if span > 0:
        importance = (importance - importance.min()) / span
    return importance.float().cpu()


def _remove_least(importance: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``mask`` less its ``count`` lowest-importance heads (ties keep the lower index, as in top_k_mask)."""
    scores = importance.double().masked_fill(~mask, -math.inf)
    return top_k_mask(scores, int(mask.sum()) - count).bool()


def michel_select(model: nn.Module, batches_fn: Callable[[int], Iterable[dict]], keep: int, *,
                  iterative: bool = False, step_fraction: float = 0.1, per_layer: bool = False) -> torch.Tensor:
    """The (layers, heads) bool mask of exactly ``keep`` heads by Michel et al.'s importance.

    Args:
        batches_fn: called with the estimation round (0, 1, ...) and returns its batches.
        keep: K.
        iterative: remove ``ceil(step_fraction * heads)`` heads per round (per layer with a per-layer
            budget), re-estimating importance with removed heads masked, until K remain; otherwise
            keep the top-K of one estimate.
        step_fraction: the share of all heads removed per round.
        per_layer: keep ``keep // layers`` heads in every layer.
    """
    layers, heads = _model_shape(model)
    check_budget(layers, heads, keep, per_layer)
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if not iterative:
        return harden(michel_importance(model, batches_fn(0)), keep, per_layer=per_layer)
    mask = torch.ones(layers, heads, dtype=torch.bool)
    round_ = 0
    per_layer_keep = keep // layers
    while int(mask.sum()) > keep:
        importance = michel_importance(model, batches_fn(round_), mask.float())
        if per_layer:
            step = max(1, math.ceil(step_fraction * heads))
            rows = [_remove_least(importance[i:i + 1], mask[i:i + 1], min(step, int(mask[i].sum()) - per_layer_keep))
                    for i in range(layers)]
            mask = torch.cat(rows)
        else:
            step = max(1, math.ceil(step_fraction * layers * heads))
            mask = _remove_least(importance, mask, min(step, int(mask.sum()) - keep))
        round_ += 1
    return mask


# --------------------------------------------------------------------------- random


def random_mask(layers: int, heads: int, keep: int, seed: int, per_layer: bool = False) -> torch.Tensor:
    """A seeded random (layers, heads) bool mask of exactly ``keep`` heads."""
    check_budget(layers, heads, keep, per_layer)
    generator = torch.Generator().manual_seed(seed)
    if per_layer:
        mask = torch.zeros(layers, heads, dtype=torch.bool)
        for i in range(layers):
            mask[i, torch.randperm(heads, generator=generator)[: keep // layers]] = True
        return mask
    flat = torch.zeros(layers * heads, dtype=torch.bool)
    flat[torch.randperm(layers * heads, generator=generator)[:keep]] = True
    return flat.view(layers, heads)


def _random_units(model: nn.Module, keep: int, ffn: FfnBudget, seed: int) -> "Selection":
    """A seeded random subset of heads and feed-forward blocks under ``ffn``'s budget."""
    layers, heads = _model_shape(model)
    blocks = feed_forward_parts(model)[0].width // ffn.block_size
    if ffn.keep_blocks is not None:
        mask = torch.cat([random_mask(layers, heads, keep, seed),
                          random_mask(layers, blocks, ffn.keep_blocks, seed + 1)], 1)
    else:
        if ffn.flops_keep_fraction is not None:
            costs, budget = flops_budget(model, ffn.block_size, ffn.flops_keep_fraction, ffn.seq)
        else:
            costs, budget = unit_costs(layers, heads, blocks, *ffn.unit_costs), ffn.cost_budget
        scores = torch.rand(costs.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        mask = top_k_mask(scores, budget_prefix(scores, costs, budget)).bool()
    return Selection(mask[:, :heads], None, {"ffn": ffn.info(int(mask[:, heads:].sum()))}, mask[:, heads:], None)


# --------------------------------------------------------------------------- one entry point


@dataclass(frozen=True)
class FfnBudget:
    """Feed-forward blocks selected alongside the heads (methods ``FFN_METHODS`` only).

    Attributes:
        block_size: intermediate neurons per gate.
        keep_blocks: blocks kept over the whole model, with ``keep`` heads (a budget per kind); or
        flops_keep_fraction: one budget for heads and blocks together, as a share of the model's FLOPs
            per token at ``seq`` (``keep`` is then unused: the budget decides how many heads stay); or
        unit_costs, cost_budget: one budget in another unit: (cost of a head, cost of a block) and what
            the kept heads and blocks may cost together (a latency budget's fitted milliseconds).
    """

    block_size: int = 64
    keep_blocks: int | None = None
    flops_keep_fraction: float | None = None
    seq: int = 128
    unit_costs: tuple[float, float] | None = None
    cost_budget: float | None = None

    def __post_init__(self):
        given = [self.keep_blocks is not None, self.flops_keep_fraction is not None, self.cost_budget is not None]
        if sum(given) != 1:
            raise ValueError("FfnBudget needs one of keep_blocks, flops_keep_fraction or cost_budget")
        if (self.unit_costs is None) != (self.cost_budget is None):
            raise ValueError("FfnBudget: unit_costs and cost_budget go together")

    def info(self, blocks_kept: int) -> dict:
        """What a selection records about its feed-forward budget."""
        out = {"block_size": self.block_size, "keep_blocks": blocks_kept,
               "flops_keep_fraction": self.flops_keep_fraction}
        if self.cost_budget is not None:
            out |= {"unit_costs": list(self.unit_costs), "cost_budget": self.cost_budget}
        return out


FFN_METHODS = ("dsp", "ste", "random")


@dataclass
class Selection:
    """The heads (and feed-forward blocks) a method kept, and what it learned or measured on the way.

    Attributes:
        mask: (layers, heads) bool, exactly K True (K / layers per layer with a per-layer budget).
        scores: the ranking the mask was taken from (gate logits, open probabilities or importance);
            None for random.
        info: method-specific numbers, e.g. ``penalty_keeps`` for hardconcrete.
        ffn_mask, ffn_scores: (layers, blocks) kept feed-forward blocks and their ranking, when an
            :class:`FfnBudget` was given.
    """

    mask: torch.Tensor
    scores: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    ffn_mask: torch.Tensor | None = None
    ffn_scores: torch.Tensor | None = None

    def heads_per_layer(self) -> list[int]:
        return self.mask.sum(1).tolist()


def add_method_gates_(model: nn.Module, method: str, keep: int, *, per_layer: bool = False, seed: int = 0,
                      ffn: FfnBudget | None = None, **options):
    """Install the training gates of ``method`` (dsp, ste or hardconcrete) as ``model.head_gates``.

    ``options`` are fields of the method's config (``GateConfig`` for dsp/ste, e.g. ``cooldown_steps``;
    ``HardConcreteConfig`` for hardconcrete, e.g. ``penalty``). With ``ffn`` (dsp, ste) the gates
    cover feed-forward blocks too (:class:`pipeline.gates.UnitGates`).
    """
    if ffn is not None:
        if method not in ("dsp", "ste"):
            raise ValueError(f"method {method!r} selects heads only; feed-forward blocks: {', '.join(FFN_METHODS)}")
        return add_unit_gates_(model, GateConfig(keep=keep, method=method, per_layer=per_layer, **options),
                               block_size=ffn.block_size, ffn_keep=ffn.keep_blocks,
                               flops_keep_fraction=ffn.flops_keep_fraction, seq=ffn.seq, seed=seed,
                               costs=ffn.unit_costs, cost_budget=ffn.cost_budget)
    if method in ("dsp", "ste"):
        return add_head_gates_(model, GateConfig(keep=keep, method=method, per_layer=per_layer, **options), seed=seed)
    if method == "hardconcrete":
        return add_hardconcrete_gates_(model, HardConcreteConfig(keep=keep, per_layer=per_layer, **options), seed=seed)
    raise ValueError(f"method {method!r} has no training gates; trained methods: {', '.join(TRAINED_METHODS)}")


def select_heads(method: str, model: nn.Module, keep: int, *, per_layer: bool = False, seed: int = 0,
                 train_gates: Callable[[nn.Module, nn.Module], object] | None = None,
                 batches_fn: Callable[[int], Iterable[dict]] | None = None,
                 step_fraction: float = 0.1, ffn: FfnBudget | None = None, **options) -> Selection:
    """Choose exactly ``keep`` heads of ``model`` by ``method``.

    Args:
        method: one of ``METHODS``.
        model: an unpruned model of a supported family.
        keep: K.
        per_layer: keep ``keep // layers`` heads in every layer instead of a global budget.
        seed: the gates' initialisation and noise, or the random subset.
        train_gates: for trained methods, ``train_gates(model, gates)`` runs the caller's training loop
            with the gates installed (``gates.step`` drives the DSP temperature). The caller decides
            joint (weights and gates in the optimizer) or pipelined (weights frozen) training.
        batches_fn: for michel, returns the training batches of an importance-estimation round.
        step_fraction: michel-iterative's share of heads removed per round.
        ffn: select feed-forward blocks too (``FFN_METHODS``; global budgets only).
        options: fields of the trained method's gate config.

    Returns:
        The kept heads, the scores they were ranked by, and method-specific info.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    layers, heads = _model_shape(model)
    check_budget(layers, heads, keep, per_layer)
    if ffn is not None:
        if method not in FFN_METHODS or per_layer:
            raise ValueError(f"feed-forward blocks are selected by {', '.join(FFN_METHODS)} with a global budget, "
                             f"not {method!r}{' per layer' if per_layer else ''}")
        if method == "random":
            return _random_units(model, keep, ffn, seed)
    if method in TRAINED_METHODS:
        if train_gates is None:
            raise ValueError(f"method {method!r} trains gates: pass train_gates")
        gates = add_method_gates_(model, method, keep, per_layer=per_layer, seed=seed, ffn=ffn, **options)
        try:
            train_gates(model, gates)
        finally:
            remove_head_gates_(model)
        info = {"gate_config": gates.config.to_dict()}
        if ffn is not None:
            mask, logits = gates.hardened().cpu(), gates.logits.detach().cpu()
            info["final_temperature"] = gates.temperature
            info["ffn"] = ffn.info(int(mask[:, heads:].sum()))
            return Selection(mask[:, :heads], logits[:, :heads], info, mask[:, heads:], logits[:, heads:])
        if method == "hardconcrete":
            info["penalty_keeps"] = gates.penalty_keeps()
            scores = gates.open_probability().detach().cpu()
        else:
            info["final_temperature"] = gates.temperature
            scores = gates.logits.detach().cpu()
        return Selection(gates.hardened().cpu(), scores, info)
    if method == "random":
        return Selection(random_mask(layers, heads, keep, seed, per_layer=per_layer))
    if batches_fn is None:
        raise ValueError(f"method {method!r} scores heads on training batches: pass batches_fn")
    if method == "michel":
        importance = michel_importance(model, batches_fn(0))
        return Selection(harden(importance, keep, per_layer=per_layer), importance)
    mask = michel_select(model, batches_fn, keep, iterative=True, step_fraction=step_fraction, per_layer=per_layer)
    return Selection(mask, None, {"step_fraction": step_fraction})
