"""Head gates: one learnable logit per attention head, and the masks that train them.

DSP (Li, Cotterell & Sachan, 2021) samples a relaxed K-subset of heads with Gumbel-soft-top-K
(Xie & Ermon, 2019); the mask scales each head's output before the attention output projection.
As the temperature falls the relaxed mask approaches a hard subset of exactly K heads.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from pipeline.architectures import attention_parts, feed_forward_parts

METHODS = ("dsp", "ste")

# Clamp for log(1 - p): the smallest positive float64, as in the paper's code.
_EPS = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class GateConfig:
    """How the gates build a mask.

    Attributes:
        keep: K, the number of heads kept, over the whole model (or per layer when ``per_layer``).
        method: "dsp" (Gumbel-soft-top-K) or "ste" (hard top-K forward, identity backward).
        temperature_start, temperature_end: the log-linear DSP schedule's ends.
        cooldown_steps: steps from start to end temperature; held at the end afterwards.
        per_layer: keep ``keep // num_layers`` heads in every layer instead of a global budget.
    """

    keep: int
    method: str = "dsp"
    temperature_start: float = 1000.0
    temperature_end: float = 1e-8
    cooldown_steps: int = 1000
    per_layer: bool = False

    def __post_init__(self):
        errors = []
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep <= 0:
            errors.append(f"keep must be a positive integer, got {self.keep!r}")
        if self.method not in METHODS:
            errors.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.temperature_start > 0 or not self.temperature_end > 0:
            errors.append("temperatures must be positive")
        if self.cooldown_steps < 1:
            errors.append(f"cooldown_steps must be >= 1, got {self.cooldown_steps}")
        if errors:
            raise ValueError("; ".join(errors))

    def to_dict(self) -> dict:
        return asdict(self)


def temperature_at(step: int, config: GateConfig) -> float:
    """Log-linear interpolation from ``temperature_start`` to ``temperature_end``, then held."""
    frac = min(max(step, 0) / config.cooldown_steps, 1.0)
    log_t = math.log(config.temperature_start) * (1 - frac) + math.log(config.temperature_end) * frac
    return math.exp(log_t)


def gumbel_soft_top_k(logits: torch.Tensor, k: int, temperature: float, *, noise: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Relaxed K-subset sample over the last dimension of a 1-D tensor.

    Repeats K times ``p_j = softmax(r / T)``, ``r += log(1 - p_j)``; returns ``sum_j p_j``, which sums
    to exactly K and tends to the hard top-K indicator of ``r`` as ``T -> 0``. Computed in float64
    because ``r / T`` reaches 1e10 at the end of the schedule.

    The K sequential steps are a few hundred operations on a vector of one entry per head: as
    autograd nodes on a GPU they cost more than a MiniLM training step (1.8x a plain step, measured
    on an H100), so the forward and backward passes run compiled on the CPU inside one autograd
    function (:class:`_SoftTopK`), and the noise is drawn on the CPU (``generator`` must be a CPU
    generator). The result is the same on every device.

    Args:
        logits: 1-D tensor of scores.
        k: subset size.
        temperature: T > 0.
        noise: add Gumbel noise (training); without it the relaxation is deterministic.
        generator: the CPU random source for the noise.
    """
    gumbel = gumbel_noise(logits.shape, generator) if noise else None
    return _SoftTopK.apply(logits, gumbel, k, temperature)


def gumbel_noise(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples in float64 on the CPU."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator)
    return u.clamp_min_(_EPS).log_().neg_().log_().neg_()  # -log(-log(u)), in place


# Below exp(-745.2) a float64 underflows to exactly 0; 1 - p clamped to _EPS pushes r down by 708.4.
_UNDERFLOW = 750.0
_PUSH = 700.0


def _saturated_top_k(r: np.ndarray, k: int, temperature: float) -> np.ndarray | None:
    """The K-hot indicator of ``r``'s top K when every softmax step of the loop is exactly one-hot.

    Step j then picks the j-th largest entry with probability exactly 1.0 (every other entry is
    more than 745 below it in units of T, so its exp underflows to 0.0) and pushes it down by
    -log(_EPS) = 708.4, below every entry still unpicked. The loop's output is then this indicator,
    bit for bit, and its gradient is exactly zero (``p * (dL/dp - <p, dL/dp>)`` vanishes for a one-hot
    ``p``). It holds once T is small against the gaps of the top K + 1 noisy scores: with Gumbel
    noise, over most of the cool-down and all of training after it. None when it does not hold.
    """
    hot = np.empty(r.size)
    return hot if _compiled_loops()[2](r, k, temperature, hot) else None


@functools.cache
def _compiled_loops():
    """The soft top-K's forward and backward loops and the one-hot test (:func:`_saturated_top_k`),
    compiled by numba on first use (about 1 s).

    Both loops are K sequential steps over one entry per head. In NumPy each step was ten calls
    forward and five backward, about 1 us each on small arrays: 0.5-1 ms a training step on this
    project's CPU and, on an H200 host where the step is bound by host time, 1.0-1.3 ms a MiniLM step
    on average (study timing). Compiled, K = 36 of 72 heads takes about 35 us forward. The arithmetic
    is the NumPy version's, element by element; sums run in order instead of pairwise. Entries whose
    exp underflows to 0 skip the exp, the division and the log (1 - 0 is 1, whose log is 0): the
    same numbers, and at T = 1e-3 and below, where most entries underflow, a quarter of the time or
    less on this project's CPU.
    """
    import numba

    @numba.njit(nogil=True)
    def saturated(r, k, temperature, hot):
        n = r.size
        if not 0 < k < n:
            return False
        order = np.argsort(-r)
        for j in range(k):  # written so that a NaN fails the test, as NumPy's min of the gaps did
            if not r[order[j]] - r[order[j + 1]] > _UNDERFLOW * temperature:
                return False
        if not r[order[0]] - r[order[k - 1]] < _PUSH - _UNDERFLOW * temperature:
            return False
        hot[:] = 0.0
        for j in range(k):
            hot[order[j]] = 1.0
        return True

    @numba.njit(nogil=True)
    def forward(r, k, temperature, probs, mask):
        """The mask (``sum_j p_j``) into ``mask``, each step's ``p_j`` into ``probs``; True, and the
        K-hot indicator, when every step is one-hot."""
        if saturated(r, k, temperature, mask):
            return True
        n = r.size
        mask[:] = 0.0
        for j in range(k):
            top = -np.inf
            for i in range(n):
                probs[j, i] = r[i] / temperature
                top = max(top, probs[j, i])
            total = 0.0
            for i in range(n):
                shifted = probs[j, i] - top
                probs[j, i] = np.exp(shifted) if shifted > -_UNDERFLOW else 0.0
                total += probs[j, i]
            for i in range(n):
                if probs[j, i] != 0.0:
                    probs[j, i] /= total
                    rest = 1.0 - probs[j, i]
                    if rest != 1.0:
                        r[i] += np.log(max(rest, _EPS))
                mask[i] += probs[j, i]
        return False

    @numba.njit(nogil=True)
    def backward(probs, g, temperature):
        k, n = probs.shape
        a, dp = np.zeros(n), np.empty(n)
        for j in range(k - 1, -1, -1):
            inner = 0.0
            for i in range(n):
                rest = 1.0 - probs[j, i]
                dp[i] = g[i] - (0.0 if rest < _EPS else a[i] * (1.0 / rest))
                inner += probs[j, i] * dp[i]
            for i in range(n):
                a[i] += (dp[i] - inner) * (probs[j, i] / temperature)
        for i in range(n):
            if not np.isfinite(a[i]):
                a[i] = 0.0
        return a

    return forward, backward, saturated


class _SoftTopK(torch.autograd.Function):
    """Gumbel-soft-top-K with a hand-written backward pass (float64, on the CPU, compiled by numba).

    Backward, with ``a_j = dL/dr_j`` and ``g = dL/dmask``: ``a_K = 0``;
    ``dL/dp_j = g - a_{j+1} / (1 - p_j)`` (zero where ``1 - p_j`` was clamped);
    ``a_j = a_{j+1} + p_j * (dL/dp_j - <p_j, dL/dp_j>) / T``; ``dL/dlogits = a_0`` (non-finite
    entries, from overflow at tiny T, become 0).

    When every step is exactly one-hot (:func:`_saturated_top_k`) the loop is skipped: same output,
    zero gradient. Otherwise both loops run compiled (:func:`_compiled_loops`): on a GPU the gates'
    host time is on the training step's critical path, so the forward is one compiled call.
    """

    @staticmethod
    def forward(ctx, logits, gumbel, k, temperature):
        r = logits.detach().to("cpu", torch.float64).numpy().copy()
        if gumbel is not None:
            r += gumbel.numpy()
        ctx.temperature = temperature
        probs, mask = np.empty((k, r.size)), np.empty(r.size)
        ctx.saturated = _compiled_loops()[0](r, k, temperature, probs, mask)
        if not ctx.saturated:
            ctx.save_for_backward(torch.from_numpy(probs))
        return torch.from_numpy(mask).to(logits.device, logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.saturated:
            return torch.zeros_like(grad), None, None, None
        probs = ctx.saved_tensors[0].numpy()
        g = np.ascontiguousarray(grad.detach().to("cpu", torch.float64).numpy())
        a = _compiled_loops()[1](probs, g, ctx.temperature)
        return torch.from_numpy(a).to(grad.device, grad.dtype), None, None, None


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Float 0/1 mask of exactly k ones at the largest scores; ties go to the lower index."""
    order = torch.sort(scores.detach().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    mask[order[:k]] = 1
    return mask.view_as(scores)


class _StraightThroughTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k):
        return top_k_mask(scores, k)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def harden(logits: torch.Tensor, keep: int, *, per_layer: bool = False) -> torch.Tensor:
    """The mask of exactly ``keep`` heads with the largest logits, shape (layers, heads), bool.

    With ``per_layer`` each layer keeps ``keep // layers`` heads.
    """
    layers, heads = logits.shape
    if per_layer:
        if keep % layers:
            raise ValueError(f"a per-layer budget needs keep divisible by {layers} layers, got {keep}")
        return torch.stack([top_k_mask(row, keep // layers) for row in logits]).bool()
    if not 0 < keep <= layers * heads:
        raise ValueError(f"keep must be in 1..{layers * heads}, got {keep}")
    return top_k_mask(logits, keep).bool()


def budget_prefix(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> int:
    """How many units, taken in descending ``scores`` order, fit in ``budget`` before the first that does not.

    The mask of a cost budget is then the top-k of the scores with this k: the selection is a prefix
    of one ranking, as with a count budget, and its cost is at most ``budget`` and within one unit's
    cost of it. Ties go to the lower index, as in :func:`top_k_mask`.
    """
    order = torch.sort(scores.detach().flatten(), descending=True, stable=True).indices
    spent = torch.cumsum(costs.detach().flatten().to(torch.float64)[order.cpu()], 0)
    return int((spent <= budget * (1 + 1e-12)).sum())


def kept_heads_from_mask(mask: torch.Tensor) -> dict[int, list[int]]:
    """{layer: [kept head indices]} from a (layers, heads) 0/1 mask."""
    return {layer: torch.nonzero(row).flatten().tolist() for layer, row in enumerate(mask.bool())}


class HeadGates(nn.Module):
    """Learnable logits (layers x heads) and the mask they produce for the current forward pass.

    A forward pre-hook on the model refreshes ``mask`` once per forward: a Gumbel-soft-top-K sample
    (or straight-through top-K) while training, the hard top-K in eval mode. Pre-hooks on every
    attention output projection scale each head's slice of the projection input by its mask value.
    """

    def __init__(self, num_layers: int, num_heads: int, config: GateConfig, seed: int = 0):
        super().__init__()
        if config.keep > num_layers * num_heads:
            raise ValueError(f"keep={config.keep} exceeds the model's {num_layers * num_heads} heads")
        self._init_logits(num_layers, num_heads, config, seed)

    def _init_logits(self, rows: int, columns: int, config: GateConfig, seed: int) -> None:
        self.config = config
        self.logits = nn.Parameter(torch.empty(rows, columns, dtype=torch.float64))
        init = torch.Generator().manual_seed(seed)
        # Xavier-uniform, as the paper's code initialises its logits.
        bound = math.sqrt(6.0 / (rows + columns))
        with torch.no_grad():
            self.logits.uniform_(-bound, bound, generator=init)
        self.step = 0
        self.noise_generator = torch.Generator().manual_seed(seed + 1)
        self.mask: torch.Tensor | None = None
        self._hooks: list = []

    @property
    def temperature(self) -> float:
        return temperature_at(self.step, self.config)

    def compute_mask(self) -> torch.Tensor:
        cfg = self.config
        if not self.training:
            return harden(self.logits, cfg.keep, per_layer=cfg.per_layer).to(torch.float64)
        if cfg.method == "ste":
            if cfg.per_layer:
                k = cfg.keep // self.logits.shape[0]
                return torch.stack([_StraightThroughTopK.apply(row, k) for row in self.logits])
            return _StraightThroughTopK.apply(self.logits, cfg.keep)
        if cfg.per_layer:
            k = cfg.keep // self.logits.shape[0]
            return torch.stack(
                [gumbel_soft_top_k(row, k, self.temperature, generator=self.noise_generator) for row in self.logits]
            )
        flat = gumbel_soft_top_k(self.logits.flatten(), cfg.keep, self.temperature, generator=self.noise_generator)
        return flat.view_as(self.logits)

    def hardened(self) -> torch.Tensor:
        return harden(self.logits.detach(), self.config.keep, per_layer=self.config.per_layer)


class UnitGates(HeadGates):
    """Gates over attention heads and feed-forward neuron blocks: logits (layers, heads + blocks).

    Row ``l`` holds layer ``l``'s head logits, then its block logits (a block is ``block_size``
    consecutive intermediate neurons). Two budgets:

    - per kind: exactly ``config.keep`` heads and ``ffn_keep`` blocks, each a Gumbel-soft-top-K
      (or straight-through top-K) over its own logits;
    - joint, in FLOPs: ``costs`` (FLOPs per token of each unit, same shape as the logits) and
      ``budget`` (FLOPs that may be kept). Each step takes the noisy scores ``r = logits + Gumbel``,
      counts how many units of ``r``'s ranking fit in the budget (:func:`budget_prefix`) and draws
      a relaxed subset of exactly that many; hardening keeps the prefix of the logits' ranking that
      fits. Heads and blocks then compete for the same FLOPs, and layers may lose both entirely.
    """

    def __init__(self, num_layers: int, num_heads: int, num_blocks: int, config: GateConfig, *,
                 ffn_keep: int | None = None, costs: torch.Tensor | None = None, budget: float | None = None,
                 seed: int = 0):
        nn.Module.__init__(self)
        if (ffn_keep is None) == (budget is None):
            raise ValueError("give either ffn_keep (a budget per kind) or costs and budget (one FLOP budget)")
        if config.per_layer:
            raise ValueError("feed-forward gates take a global budget, not per_layer")
        if ffn_keep is not None and not (config.keep <= num_layers * num_heads and 0 < ffn_keep <= num_layers * num_blocks):
            raise ValueError(f"budget of {config.keep} heads and {ffn_keep} blocks does not fit "
                             f"{num_layers * num_heads} heads and {num_layers * num_blocks} blocks")
        if budget is not None and (costs is None or tuple(costs.shape) != (num_layers, num_heads + num_blocks)):
            raise ValueError(f"costs must have shape ({num_layers}, {num_heads + num_blocks})")
        self._init_logits(num_layers, num_heads + num_blocks, config, seed)
        self.num_heads, self.num_blocks = num_heads, num_blocks
        self.ffn_keep, self.budget = ffn_keep, budget
        self.register_buffer("costs", costs.to(torch.float64) if costs is not None else None)

    def _split(self, mask_heads: torch.Tensor, mask_blocks: torch.Tensor) -> torch.Tensor:
        return torch.cat([mask_heads.view(-1, self.num_heads), mask_blocks.view(-1, self.num_blocks)], 1)

    def compute_mask(self) -> torch.Tensor:
        cfg = self.config
        if not self.training:
            return self.hardened().to(torch.float64)
        heads, blocks = self.logits[:, :self.num_heads], self.logits[:, self.num_heads:]
        if self.budget is None:
            if cfg.method == "ste":
                return self._split(_StraightThroughTopK.apply(heads.flatten(), cfg.keep),
                                   _StraightThroughTopK.apply(blocks.flatten(), self.ffn_keep))
            return self._split(
                gumbel_soft_top_k(heads.flatten(), cfg.keep, self.temperature, generator=self.noise_generator),
                gumbel_soft_top_k(blocks.flatten(), self.ffn_keep, self.temperature, generator=self.noise_generator),
            )
        flat = self.logits.flatten()
        if cfg.method == "ste":
            k = budget_prefix(flat, self.costs, self.budget)
            return _StraightThroughTopK.apply(flat, k).view_as(self.logits)
        gumbel = gumbel_noise(flat.shape, self.noise_generator)
        k = budget_prefix(flat.detach().cpu() + gumbel, self.costs.cpu(), self.budget)
        return _SoftTopK.apply(flat, gumbel, k, self.temperature).view_as(self.logits)

    def hardened(self) -> torch.Tensor:
        """(layers, heads + blocks) bool: the kept heads, then the kept blocks, of every layer."""
        logits = self.logits.detach()
        if self.budget is None:
            return self._split(harden(logits[:, :self.num_heads], self.config.keep),
                               harden(logits[:, self.num_heads:], self.ffn_keep))
        return top_k_mask(logits, budget_prefix(logits, self.costs, self.budget)).bool()


def install_mask_hooks_(model: nn.Module, current_mask, *, block_size: int | None = None, refresh=None) -> list:
    """Scale each head's slice of every attention output projection's input by ``current_mask()``
    and, with ``block_size``, each feed-forward block's slice of every second feed-forward linear's input.

    Args:
        current_mask: returns the (layers, heads) mask, or (layers, heads + blocks) with ``block_size``.
        refresh: called at the start of every forward of the base model, before the mask is read
            (gates draw their mask there).

    Scaling a linear's input features is scaling its weight's columns: ``W (m * x) = (W * m) x``.
    Each forward stacks the layers' weights once per kind and scales all of them with one multiply;
    every projection then runs on its slice of the product. On a GPU each op is a kernel launch
    paid on the Python side, and a MiniLM training step is bound by those: scaling the activations
    took a multiply per layer forward and three backward (34 launches a step in all on an H100),
    this takes a stack and a multiply forward and a stack, a multiply and a reduction backward for
    all layers together. Under autocast the product is cast once, where plain steps cast each layer's
    weight forward and its gradient backward: the gated step launches fewer casts than a plain one.
    The result is the same: exactly the weights' columns where the mask is 0 or 1.

    Returns:
        Handles; ``handle.remove()`` on each undoes it.
    """
    parts = attention_parts(model)
    heads = parts[0].num_heads
    kinds = [([p.output for p in parts], heads)]  # (the layers' linears, the mask's columns for them)
    if block_size:
        ffn = feed_forward_parts(model)
        kinds.append(([p.output for p in ffn], ffn[0].width // block_size))
    cache: list = []

    def start_forward(module, args, kwargs):
        if refresh is not None:
            refresh()
        cache.clear()

    def scaled_weights() -> list:
        if not cache:
            weight = parts[0].output.weight
            # Converted where it lives, then copied: CPU gates cost a GPU step one copy and no kernel.
            mask = current_mask().to(weight.dtype).to(weight.device)
            kind = weight.device.type
            cast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            # One split, not a slice per kind: a slice's backward launches two kernels, a split's one.
            columns_of = mask.split([groups for _, groups in kinds], 1) if len(kinds) > 1 else (mask,)
            for (linears, groups), part in zip(kinds, columns_of):
                stacked = torch.stack([linear.weight for linear in linears])  # (layers, out, in)
                layers, rows, columns = stacked.shape
                scale = part.reshape(layers, 1, groups, 1)
                scaled = (stacked.view(layers, rows, groups, columns // groups) * scale).view_as(stacked)
                # Under autocast one cast of all layers' weights, which autocast's linear then uses
                # as they are, instead of one cast per layer (and one per layer backward).
                cache.append((scaled if cast is None else scaled.to(cast)).unbind(0))
        return cache

    def scaled_forward(kind: int, layer: int, linear: nn.Linear):
        def forward(hidden):
            return nn.functional.linear(hidden, scaled_weights()[kind][layer], linear.bias)

        return forward

    handles = [model.base_model.register_forward_pre_hook(start_forward, with_kwargs=True)]
    for kind, (linears, _) in enumerate(kinds):
        for layer, linear in enumerate(linears):
            if "forward" in vars(linear):
                raise ValueError(f"layer {layer}'s {type(linear).__name__} already has its forward replaced")
            linear.forward = scaled_forward(kind, layer, linear)
            handles.append(_ForwardOverride(linear))
    return handles


class _ForwardOverride:
    """Handle of a forward set on a module instance: ``remove()`` restores the class's forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        vars(self.module).pop("forward", None)


GATES_ON = "DSPRUNE_GATES_ON"  # where gate parameters live: auto (default), model or cpu


def gate_device(model: nn.Module) -> torch.device:
    """Where new gates live: beside a CUDA model on the CPU, otherwise on the model's device.

    DSP's soft top-K runs in NumPy on the CPU either way. Measured on an H100 (MiniLM, batch 32,
    interleaved rounds; ``python -m benchmarks.study timing``), gates on the CPU added 8.6% to a
    training step for DSP and 1.5% for STE, against 27.8% and 16.1% on the GPU: there every step
    copied the logits to the host (a synchronization) and the float64 parameters launched their own
    kernels for clipping and AdamW. ``DSPRUNE_GATES_ON=model`` or ``cpu`` overrides the choice. A
    distributed run keeps them on the model's device, where its collectives reduce them.
    """
    device = next(model.parameters()).device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    placement = os.environ.get(GATES_ON, "auto")
    if placement not in ("auto", "model", "cpu"):
        raise ValueError(f"{GATES_ON}={placement!r}: expected auto, model or cpu")
    if distributed or placement == "model":
        return device
    return torch.device("cpu") if placement == "cpu" or device.type == "cuda" else device


def add_head_gates_(model: nn.Module, config: GateConfig, seed: int = 0) -> HeadGates:
    """Install head gates on ``model`` in place and return them.

    The gates are registered as ``model.head_gates`` so they are ordinary parameters of the model
    (optimizers and DistributedDataParallel see them); ``remove_head_gates_`` takes them off again.
    """
    if hasattr(model, "head_gates"):
        raise ValueError("model already has head gates")
    parts = attention_parts(model)
    heads = {p.num_heads for p in parts}
    if len(heads) != 1 or 0 in heads:
        raise ValueError(f"gates need an unpruned model with equal heads per layer, got {[p.num_heads for p in parts]}")
    gates = HeadGates(len(parts), heads.pop(), config, seed=seed).to(gate_device(model))
    model.head_gates = gates

    def refresh():
        gates.mask = gates.compute_mask()

    gates._hooks += install_mask_hooks_(model, lambda: gates.mask, refresh=refresh)
    return gates


def flops_budget(model: nn.Module, block_size: int, keep_fraction: float, seq: int = 128) -> tuple[torch.Tensor, float]:
    """Unit costs (layers, heads + blocks) and the FLOPs of them that may be kept.

    The kept units plus everything no gate covers (embeddings' projections, pooler, task head) cost at
    most ``keep_fraction`` of the unpruned model's FLOPs per token at ``seq``.
    """
    from pipeline.surgery import flops_per_token, unit_flops

    head_costs, block_costs = unit_flops(model, block_size, seq)
    costs = torch.cat([head_costs, block_costs], 1)
    total = flops_per_token(model, seq)
    budget = float(costs.sum()) - (1 - keep_fraction) * total
    if not 0 < keep_fraction <= 1 or budget < 0:
        raise ValueError(f"flops_keep_fraction {keep_fraction} is outside ({1 - float(costs.sum()) / total:.3f}, 1]: "
                         "the rest of the FLOPs is not in any head or feed-forward block")
    return costs, budget


def unit_costs(num_layers: int, num_heads: int, num_blocks: int, head_cost: float, block_cost: float) -> torch.Tensor:
    """Costs (layers, heads + blocks) with one price per kind: a cost budget in any unit (e.g. fitted ms)."""
    row = torch.tensor([head_cost] * num_heads + [block_cost] * num_blocks, dtype=torch.float64)
    return row.expand(num_layers, -1).clone()


def add_unit_gates_(model: nn.Module, config: GateConfig, *, block_size: int, ffn_keep: int | None = None,
                    flops_keep_fraction: float | None = None, seq: int = 128, seed: int = 0,
                    costs: tuple[float, float] | None = None, cost_budget: float | None = None) -> UnitGates:
    """Install gates over heads and feed-forward blocks as ``model.head_gates`` and return them.

    Args:
        config: the DSP/STE schedule; ``config.keep`` is the head budget when ``ffn_keep`` is given.
        block_size: intermediate neurons per feed-forward gate; must divide the intermediate size.
        ffn_keep: blocks kept (a budget per kind), or None with ``flops_keep_fraction``.
        flops_keep_fraction: one budget: the share of the model's FLOPs per token at ``seq`` that the
            kept heads and blocks (plus everything not gated) may cost.
        costs, cost_budget: one budget in another unit: (cost of a head, cost of a block) and what
            the kept ones may cost together (a latency budget's fitted milliseconds).
    """
    if hasattr(model, "head_gates"):
        raise ValueError("model already has head gates")
    parts, ffn = attention_parts(model), feed_forward_parts(model)
    heads = {p.num_heads for p in parts}
    widths = {p.width for p in ffn}
    if len(heads) != 1 or 0 in heads or len(widths) != 1:
        raise ValueError("gates need an unpruned model with equal heads and feed-forward widths per layer")
    width = widths.pop()
    if block_size <= 0 or width % block_size:
        raise ValueError(f"block_size {block_size} does not divide the feed-forward width {width}")
    num_heads, num_blocks = heads.pop(), width // block_size
    unit_cost = budget = None
    if flops_keep_fraction is not None:
        unit_cost, budget = flops_budget(model, block_size, flops_keep_fraction, seq)
    elif cost_budget is not None:
        unit_cost, budget = unit_costs(len(parts), num_heads, num_blocks, *costs), float(cost_budget)
    gates = UnitGates(len(parts), num_heads, num_blocks, config, ffn_keep=ffn_keep, costs=unit_cost,
                      budget=budget, seed=seed).to(gate_device(model))
    model.head_gates = gates

    def refresh():
        gates.mask = gates.compute_mask()

    gates._hooks += install_mask_hooks_(model, lambda: gates.mask, block_size=block_size, refresh=refresh)
    return gates


def add_fixed_mask_(model: nn.Module, mask: torch.Tensor, ffn_mask: torch.Tensor | None = None) -> list:
    """Scale heads by a fixed (layers, heads) mask, and feed-forward blocks by a (layers, blocks) one.

    Returns hook handles (``handle.remove()`` undoes it). A block is ``width // blocks`` neurons.
    """
    mask = mask.detach().to(torch.float64)
    if ffn_mask is None:
        return install_mask_hooks_(model, lambda: mask)
    block = feed_forward_parts(model)[0].width // ffn_mask.shape[1]
    both = torch.cat([mask, ffn_mask.detach().to(mask)], 1)
    return install_mask_hooks_(model, lambda: both, block_size=block)


def kept_neurons_from_mask(ffn_mask: torch.Tensor, block_size: int) -> dict[int, list[int]]:
    """{layer: [kept neuron indices]} from a (layers, blocks) 0/1 block mask."""
    return {layer: [b * block_size + i for b in torch.nonzero(row).flatten().tolist() for i in range(block_size)]
            for layer, row in enumerate(ffn_mask.bool())}


def remove_head_gates_(model: nn.Module) -> HeadGates:
    """Take the gates off ``model`` (hooks and parameters) and return them."""
    gates = model.head_gates
    for handle in gates._hooks:
        handle.remove()
    gates._hooks.clear()
    del model.head_gates
    return gates
