"""Gumbel-soft-top-K, the temperature schedule, hardening and the gate hooks."""
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_bert
from pipeline.gates import (
    GateConfig,
    add_fixed_mask_,
    add_head_gates_,
    gumbel_soft_top_k,
    harden,
    install_mask_hooks_,
    kept_heads_from_mask,
    remove_head_gates_,
    temperature_at,
    top_k_mask,
)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("temperature", [100.0, 1.0, 0.01])
def test_soft_top_k_mass_sums_to_k(k, temperature):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(12, generator=g, dtype=torch.float64)
    mask = gumbel_soft_top_k(logits, k, temperature, generator=g)
    assert mask.sum().item() == pytest.approx(k, abs=1e-9)
    assert (mask >= 0).all()  # an entry may pass 1 at high T: the relaxation bounds only the sum


def test_soft_top_k_approaches_hard_top_k_as_temperature_falls():
    logits = torch.tensor([0.3, -1.0, 2.0, 0.9, 0.1, 1.5], dtype=torch.float64)
    hard = top_k_mask(logits, 3)
    temperatures = (0.5, 0.1, 0.02, 1e-3)
    errors = [(gumbel_soft_top_k(logits, 3, t, noise=False) - hard).abs().max().item() for t in temperatures]
    assert errors == sorted(errors, reverse=True)  # monotone towards the hard subset
    assert errors[0] > 0.1
    assert errors[-1] < 1e-6


def test_gradients_reach_the_logits(tiny_inputs):
    model = make_tiny_bert()
    gates = add_head_gates_(model, GateConfig(keep=3, temperature_start=1.0, temperature_end=1.0))
    model.train()
    labels = torch.tensor([0, 1, 0])
    model(**tiny_inputs, labels=labels).loss.backward()
    assert gates.logits.grad is not None
    assert gates.logits.grad.abs().sum() > 0
    assert gates.mask.sum().item() == pytest.approx(3)


def test_ste_forward_is_hard_and_backward_is_identity(tiny_inputs):
    model = make_tiny_bert()
    gates = add_head_gates_(model, GateConfig(keep=5, method="ste"))
    model.train()
    model(**tiny_inputs, labels=torch.tensor([0, 1, 0])).loss.backward()
    assert set(gates.mask.unique().tolist()) == {0.0, 1.0} and gates.mask.sum() == 5
    assert gates.logits.grad.abs().sum() > 0


def test_temperature_schedule_is_log_linear_then_held():
    cfg = GateConfig(keep=2, temperature_start=1000.0, temperature_end=1e-8, cooldown_steps=100)
    assert temperature_at(0, cfg) == pytest.approx(1000.0)
    assert temperature_at(50, cfg) == pytest.approx(math.sqrt(1000.0 * 1e-8))
    assert temperature_at(100, cfg) == pytest.approx(1e-8)
    assert temperature_at(10_000, cfg) == pytest.approx(1e-8)


@pytest.mark.parametrize("keep", [1, 5, 8, 36, 71, 72])
def test_harden_keeps_exactly_k_even_with_ties(keep):
    logits = torch.zeros(6, 12, dtype=torch.float64)  # all tied: the lowest indices win
    logits[2, 3] = 5.0
    mask = harden(logits, keep)
    assert mask.sum().item() == keep
    assert mask[2, 3]


def test_harden_per_layer_and_bad_budgets():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    mask = harden(logits, 8, per_layer=True)
    assert mask.sum(1).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="divisible"):
        harden(logits, 6, per_layer=True)
    with pytest.raises(ValueError, match="keep must be in"):
        harden(logits, 25)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_gate_config_rejects_bad_k(bad):
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        GateConfig(keep=bad)


def test_gates_refuse_k_above_head_count():
    with pytest.raises(ValueError, match="exceeds"):
        add_head_gates_(make_tiny_bert(), GateConfig(keep=9))


def test_eval_mode_uses_the_hard_mask_and_removal_restores_the_model(tiny_inputs):
    model = make_tiny_bert()
    with torch.no_grad():
        before = model(**tiny_inputs).logits
    gates = add_head_gates_(model, GateConfig(keep=3))
    model.eval()
    with torch.no_grad():
        gated = model(**tiny_inputs).logits
        expected_mask = harden(gates.logits, 3).double()
    assert torch.equal(gates.mask, expected_mask)
    handles = add_fixed_mask_(make_tiny_bert(), expected_mask)  # same weights (same seed), fixed mask
    assert handles
    remove_head_gates_(model)
    assert not hasattr(model, "head_gates")
    with torch.no_grad():
        after = model(**tiny_inputs).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, gated)


def _scale_inputs_(model, mask, block_size):
    """The plain definition of a mask: pre-hooks scaling each head's and each block's input slice."""
    from pipeline.architectures import attention_parts, feed_forward_parts

    parts, ffn = attention_parts(model), feed_forward_parts(model)
    heads = parts[0].num_heads

    def hook(rows, layer, width):
        return lambda module, args: (args[0] * rows[layer].repeat_interleave(width),)

    head_rows, block_rows = mask[:, :heads], mask[:, heads:]
    return ([p.output.register_forward_pre_hook(hook(head_rows, p.layer, p.head_dim)) for p in parts]
            + [p.output.register_forward_pre_hook(hook(block_rows, p.layer, block_size)) for p in ffn])


def test_mask_hooks_equal_scaling_each_head_and_block_input(tiny_inputs):
    """Scaling weight columns gives the outputs and gradients (mask and weights) of scaling the inputs."""
    block_size, labels = 16, torch.tensor([0, 1, 1])
    mask = torch.rand(2, 4 + 128 // block_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask[0, 1] = mask[1, 5] = 0.0  # a pruned head and a pruned block
    results = []
    for install in (_scale_inputs_, None):
        model = make_tiny_bert()
        leaf = mask.clone().requires_grad_(True)
        if install is None:
            install_mask_hooks_(model, lambda: leaf, block_size=block_size)
        else:
            install(model, leaf.float(), block_size)
        loss = model(**tiny_inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), leaf.grad, [p.grad for p in model.parameters()]))
    (loss, mask_grad, grads), (loss_ref, mask_grad_ref, grads_ref) = results[1], results[0]
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(mask_grad, mask_grad_ref, rtol=1e-4, atol=1e-7)
    assert mask_grad[0, 1] != 0 and mask_grad[1, 5] != 0  # a pruned unit still learns whether to return
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


def test_mask_hooks_under_autocast_match_scaling_the_inputs(tiny_inputs):
    """Under bf16 autocast the hooks cast the scaled weights once; a 0/1 mask then gives the loss and
    gradients of scaling the inputs, which autocast's linear casts layer by layer."""
    labels = torch.tensor([0, 1, 1])
    mask = torch.ones(2, 4 + 128 // 16, dtype=torch.float64)
    mask[0, 1] = mask[1, 2] = mask[1, 5] = 0.0
    results = []
    for install in (_scale_inputs_, None):
        model = make_tiny_bert()
        leaf = mask.clone().requires_grad_(True)
        if install is None:
            install_mask_hooks_(model, lambda: leaf, block_size=16)
        else:
            install(model, leaf.float(), 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**tiny_inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), leaf.grad, [p.grad for p in model.parameters()]))
    (loss, mask_grad, grads), (loss_ref, mask_grad_ref, grads_ref) = results[1], results[0]
    assert loss.dtype == loss_ref.dtype
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(mask_grad, mask_grad_ref, rtol=2e-2, atol=1e-3)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grad_ref, rtol=2e-2, atol=1e-3)


def test_gated_training_is_deterministic_for_a_seed(tiny_inputs):
    def train_once():
        model = make_tiny_bert()
        gates = add_head_gates_(model, GateConfig(keep=3, temperature_start=10.0, temperature_end=0.1,
                                                  cooldown_steps=5), seed=7)
        optimizer = torch.optim.AdamW([gates.logits], lr=0.5)
        model.train()
        for step in range(5):
            gates.step = step
            model(**tiny_inputs, labels=torch.tensor([0, 1, 1])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return gates.logits.detach().clone()

    assert torch.equal(train_once(), train_once())


def test_kept_heads_from_mask():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert kept_heads_from_mask(mask) == {0: [0, 2], 1: []}


def _autograd_soft_top_k(r, k, temperature):
    """The textbook form, every step an autograd node: the reference for the hand-written backward."""
    eps = torch.full_like(r, torch.finfo(torch.float64).tiny)
    mask = torch.zeros_like(r)
    for _ in range(k):
        p = torch.softmax(r / temperature, dim=-1)
        mask = mask + p
        r = r + torch.log(torch.maximum(1 - p, eps))
    return mask


@pytest.mark.parametrize("temperature", [50.0, 1.0, 0.2, 0.05, 1e-3, 1e-8])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_hand_written_backward_matches_autograd(temperature, k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(12, dtype=torch.float64, generator=g)
    upstream = torch.randn(12, dtype=torch.float64, generator=g)
    fast = logits.clone().requires_grad_(True)
    slow = logits.clone().requires_grad_(True)
    mask = gumbel_soft_top_k(fast, k, temperature, noise=False)
    reference = _autograd_soft_top_k(slow, k, temperature)
    assert torch.allclose(mask, reference, atol=1e-12)
    (mask * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.allclose(fast.grad, slow.grad, rtol=1e-7, atol=1e-10)


def test_saturated_steps_skip_the_loop_only_when_every_step_is_one_hot():
    from pipeline.gates import _saturated_top_k

    r = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).numpy()
    hot = _saturated_top_k(r, 4, 1e-8)
    assert hot is not None and hot.sum() == 4 and set(hot.nonzero()[0]) == set(np.argsort(-r)[:4])
    assert _saturated_top_k(r, 4, 1.0) is None  # gaps of a unit normal sample are far below 750 T
    tied = r.copy()
    order = np.argsort(-r)
    tied[order[2]] = tied[order[1]] - 1e-9  # the 2nd and 3rd scores 1e-9 apart: that step is not one-hot
    assert _saturated_top_k(tied, 4, 1e-8) is None
    assert _saturated_top_k(r, 12, 1e-8) is None  # K = n: no K + 1-th score to compare with
    assert _saturated_top_k(r, 0, 1e-8) is None  # K = 0: the loop returns zeros
    assert gumbel_soft_top_k(torch.from_numpy(r), 0, 1e-8).sum() == 0
    wide = r.copy()
    wide[order[0]] += 1000.0  # picked and pushed by 708, it would still lead: the loop picks it twice
    assert _saturated_top_k(wide, 4, 1e-8) is None


@pytest.mark.parametrize("gap", [1e-9, 1e-6, 1e-3])
def test_near_ties_at_low_temperature_match_autograd(gap):
    """Two of the top K + 1 scores 1e-9 to 1e-3 apart at T = 1e-8: the loop runs below the one-hot
    shortcut's threshold (750 T), the shortcut above it, and both agree with autograd."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(12, dtype=torch.float64, generator=g)
    order = torch.argsort(logits, descending=True)
    logits[order[3]] = logits[order[2]] - gap
    upstream = torch.randn(12, dtype=torch.float64, generator=g)
    fast = logits.clone().requires_grad_(True)
    slow = logits.clone().requires_grad_(True)
    mask = gumbel_soft_top_k(fast, 4, 1e-8, noise=False)
    reference = _autograd_soft_top_k(slow, 4, 1e-8)
    assert torch.equal(mask, reference)
    (mask * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.allclose(fast.grad, slow.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_by_device_group_matches_torch(max_norm):
    """The per-device clipping of gated training: torch's global norm and scale, float32 weights
    beside float64 gates; a large max_norm leaves the gradients as they were."""
    from pipeline.training import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(6, 12, dtype=torch.float64, generator=g)]
    theirs = [t.clone() for t in ours]
    params = []
    for tensors in (ours, theirs):
        group = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
        for p, t in zip(group, tensors):
            p.grad = t
        params.append(group)
    params[0].append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped, as torch skips it
    total = clip_grad_norm_(params[0], max_norm)
    expected = torch.nn.utils.clip_grad_norm_(params[1], max_norm)
    assert torch.allclose(total.double(), expected.double(), rtol=1e-6)
    for a, b in zip(params[0], params[1]):
        assert a.grad.dtype == b.grad.dtype and torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
