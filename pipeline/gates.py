"""Head gates: one learnable logit per attention head, and the masks that train them.

DSP (Li, Cotterell & Sachan, 2021) samples a relaxed K-subset of heads with Gumbel-soft-top-K
(Xie & Ermon, 2019); the mask scales each head's output before the attention output projection.
As the temperature falls the relaxed mask approaches a hard subset of exactly K heads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from pipeline.architectures import attention_parts

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
    on an H100), so the forward and backward passes run in NumPy on the CPU inside one autograd
    function (:class:`_SoftTopK`), and the noise is drawn on the CPU (``generator`` must be a CPU
    generator). The result is the same on every device.

    Args:
        logits: 1-D tensor of scores.
        k: subset size.
        temperature: T > 0.
        noise: add Gumbel noise (training); without it the relaxation is deterministic.
        generator: the CPU random source for the noise.
    """
    gumbel = None
    if noise:
        u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(_EPS)))
    return _SoftTopK.apply(logits, gumbel, k, temperature)


class _SoftTopK(torch.autograd.Function):
    """Gumbel-soft-top-K with a hand-written backward pass (NumPy, float64, on the CPU).

    Backward, with ``a_j = dL/dr_j`` and ``g = dL/dmask``: ``a_K = 0``;
    ``dL/dp_j = g - a_{j+1} / (1 - p_j)`` (zero where ``1 - p_j`` was clamped);
    ``a_j = a_{j+1} + p_j * (dL/dp_j - <p_j, dL/dp_j>) / T``; ``dL/dlogits = a_0``.
    """

    @staticmethod
    def forward(ctx, logits, gumbel, k, temperature):
        r = logits.detach().to("cpu", torch.float64).numpy().copy()
        if gumbel is not None:
            r += gumbel.numpy()
        probs, clamped = np.empty((k, r.size)), np.empty((k, r.size), dtype=bool)
        for j in range(k):
            s = r / temperature
            e = np.exp(s - s.max())
            p = e / e.sum()
            probs[j] = p
            rest = 1.0 - p
            clamped[j] = rest < _EPS
            r += np.log(np.maximum(rest, _EPS))
        ctx.save_for_backward(torch.from_numpy(probs), torch.from_numpy(clamped))
        ctx.temperature = temperature
        return torch.from_numpy(probs.sum(0)).to(logits.device, logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        probs, clamped = (t.numpy() for t in ctx.saved_tensors)
        g = grad.detach().to("cpu", torch.float64).numpy()
        a = np.zeros(probs.shape[1])
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for j in range(probs.shape[0] - 1, -1, -1):
                p = probs[j]
                dp = g - np.where(clamped[j], 0.0, a / np.where(clamped[j], 1.0, 1.0 - p))
                a = a + p * (dp - np.dot(p, dp)) / ctx.temperature
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
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
        self.config = config
        self.logits = nn.Parameter(torch.empty(num_layers, num_heads, dtype=torch.float64))
        init = torch.Generator().manual_seed(seed)
        # Xavier-uniform, as the paper's code initialises its logits.
        bound = math.sqrt(6.0 / (num_layers + num_heads))
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


def scale_heads_hook(mask_row, head_dim):
    """A forward pre-hook scaling each head's slice of the output projection input by ``mask_row()``."""

    def hook(module, args):
        hidden = args[0]
        scale = mask_row().to(hidden.device, hidden.dtype)
        # Views only: repeat_interleave would size its output on the host, a GPU sync per layer.
        per_head = hidden.unflatten(-1, (scale.numel(), head_dim)) * scale.unsqueeze(-1)
        return (per_head.flatten(-2),) + tuple(args[1:])

    return hook


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
    device = next(model.parameters()).device
    gates = HeadGates(len(parts), heads.pop(), config, seed=seed).to(device)
    model.head_gates = gates

    def refresh(module, args, kwargs):
        gates.mask = gates.compute_mask()

    gates._hooks.append(model.register_forward_pre_hook(refresh, with_kwargs=True))
    for p in parts:
        row = (lambda layer: (lambda: gates.mask[layer]))(p.layer)
        gates._hooks.append(p.output.register_forward_pre_hook(scale_heads_hook(row, p.head_dim)))
    return gates


def add_fixed_mask_(model: nn.Module, mask: torch.Tensor) -> list:
    """Scale heads by a fixed (layers, heads) mask; returns hook handles (``handle.remove()`` undoes it)."""
    handles = []
    mask = mask.detach().to(torch.float64)
    for p in attention_parts(model):
        row = (lambda layer: (lambda: mask[layer]))(p.layer)
        handles.append(p.output.register_forward_pre_hook(scale_heads_hook(row, p.head_dim)))
    return handles


def remove_head_gates_(model: nn.Module) -> HeadGates:
    """Take the gates off ``model`` (hooks and parameters) and return them."""
    gates = model.head_gates
    for handle in gates._hooks:
        handle.remove()
    gates._hooks.clear()
    del model.head_gates
    return gates
