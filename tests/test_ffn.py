"""Feed-forward block pruning: gates with exact budgets, surgery that equals masking, FLOPs by hand."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_bert

from pipeline.architectures import feed_forward_parts
from pipeline.gates import (
    GateConfig,
    add_fixed_mask_,
    add_unit_gates_,
    budget_prefix,
    kept_neurons_from_mask,
    remove_head_gates_,
)
from pipeline.methods import FfnBudget, select_heads
from pipeline.surgery import flops_per_token, load_pruned, prune_ffn_, prune_heads_, save_pruned, unit_flops

# Tiny BERT: 3 layers x 4 heads of 8 dims, hidden 32, feed-forward width 128 = 4 blocks of 32.
BLOCK = 32
HEADS = {0: [0, 2], 1: [], 2: [1, 2, 3]}
BLOCKS = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)  # layer 1 loses everything


def _head_mask(kept=HEADS, layers=3, heads=4):
    mask = torch.zeros(layers, heads, dtype=torch.float64)
    for layer, hs in kept.items():
        mask[layer, hs] = 1
    return mask


def _pruned(attn="eager"):
    model = make_tiny_bert(layers=3)
    model.config._attn_implementation = attn
    prune_heads_(model, HEADS)
    prune_ffn_(model, kept_neurons_from_mask(BLOCKS, BLOCK))
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pruned_equals_masked_with_blocks_and_an_emptied_layer(attn, tiny_inputs):
    masked = make_tiny_bert(layers=3)
    masked.config._attn_implementation = attn
    add_fixed_mask_(masked, _head_mask(), BLOCKS)
    pruned = _pruned(attn)
    with torch.no_grad():  # hidden states: the random classifier's logits are too small to tell models apart
        reference = masked.bert(**tiny_inputs).last_hidden_state
        diff = (reference - pruned.bert(**tiny_inputs).last_hidden_state).abs().max().item()
        unmasked = make_tiny_bert(layers=3).bert(**tiny_inputs).last_hidden_state
    assert diff <= 1e-5
    assert (unmasked - reference).abs().max().item() > 1e-2  # the masks changed the function (1000x the tolerance)
    assert [p.width for p in feed_forward_parts(pruned)] == [96, 0, 128]
    assert pruned.config.dsprune_kept_ffn["0"] == [*range(0, 32), *range(64, 128)]


def test_pruned_blocks_round_trip_through_save_and_load(tmp_path, tiny_inputs):
    model = _pruned()
    save_pruned(model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert len(config["dsprune_kept_ffn"]["1"]) == 0
    reloaded = load_pruned(tmp_path / "model")
    state, original = reloaded.state_dict(), model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    with torch.no_grad():
        assert torch.allclose(reloaded(**tiny_inputs).logits, model(**tiny_inputs).logits, atol=1e-6)
    assert [p.width for p in feed_forward_parts(reloaded)] == [96, 0, 128]


def test_pruning_blocks_twice_keeps_original_numbering():
    model = make_tiny_bert(layers=3)
    prune_ffn_(model, {0: list(range(64, 128))})
    prune_ffn_(model, {0: [0, 1, 63]})  # indices into the current neurons
    assert model.config.dsprune_kept_ffn["0"] == [64, 65, 127]
    assert model.config.dsprune_kept_ffn["2"] == list(range(128))


def test_flops_model_against_hand_counts():
    seq = 11
    model = make_tiny_bert(layers=3)
    # Per token and layer, in MACs: q/k/v/o 4 * 32 * 32; attention scores and weighted sum 2 * seq * 4 * 8;
    # feed-forward 2 * 32 * 128. Per sequence: pooler 32 * 32 and classifier 32 * 2 (divided by seq).
    layer = 4 * 32 * 32 + 2 * seq * 4 * 8 + 2 * 32 * 128
    assert flops_per_token(model, seq) == 2 * 3 * layer + 2 * (32 * 32 + 32 * 2) // seq
    heads, blocks = unit_flops(model, BLOCK, seq)
    assert heads.shape == (3, 4) and blocks.shape == (3, 4)
    assert heads[0, 0] == 2 * (4 * 32 * 8 + 2 * seq * 8)  # one head: its q/k/v rows, o columns, scores
    assert blocks[0, 0] == 2 * (2 * 32 * BLOCK)  # one block: 32 rows in, 32 columns out
    pruned = _pruned()
    # Layer 1 keeps nothing (its dead neuron is not counted); layer 0 keeps 2 heads and 3 blocks.
    kept = 2 * (4 * 32 * 8 + 2 * seq * 8) * (2 + 0 + 3) + 2 * (2 * 32 * BLOCK) * (3 + 0 + 4)
    assert flops_per_token(pruned, seq) == kept + 2 * (32 * 32 + 32 * 2) // seq
    assert flops_per_token(model, seq) - flops_per_token(pruned, seq) == (
        heads * (1 - _head_mask())).sum() + (blocks * (1 - BLOCKS)).sum()


def test_budget_prefix_takes_the_ranking_until_the_first_unit_that_does_not_fit():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    costs = torch.tensor([2.0, 3.0, 1.0, 1.0, 1.0])
    assert budget_prefix(scores, costs, 5.0) == 2  # 2 + 3
    assert budget_prefix(scores, costs, 4.9) == 1  # the second unit does not fit; the prefix stops
    assert budget_prefix(scores, costs, 100.0) == 5
    assert budget_prefix(scores, costs, 1.0) == 0
    assert budget_prefix(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]), 1.0) == 1  # ties: lower index first


@pytest.mark.parametrize("method", ["dsp", "ste"])
def test_gates_with_a_budget_per_kind_keep_exact_counts(method, tiny_inputs):
    model = make_tiny_bert(layers=3)
    gates = add_unit_gates_(model, GateConfig(keep=5, method=method, cooldown_steps=10), block_size=BLOCK, ffn_keep=7)
    model.train()
    loss = model(**tiny_inputs, labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    assert gates.mask.shape == (3, 8)
    assert gates.mask[:, :4].sum().item() == pytest.approx(5) and gates.mask[:, 4:].sum().item() == pytest.approx(7)
    assert gates.logits.grad is not None and gates.logits.grad.abs().sum() > 0
    hard = gates.hardened()
    assert hard[:, :4].sum() == 5 and hard[:, 4:].sum() == 7
    remove_head_gates_(model)


def test_flop_budget_gates_respect_the_budget_while_training_and_hardened(tiny_inputs):
    model = make_tiny_bert(layers=3)
    total = flops_per_token(model, 128)
    gates = add_unit_gates_(model, GateConfig(keep=1, cooldown_steps=10), block_size=BLOCK,
                            flops_keep_fraction=0.5, seq=128, seed=3)
    model.train()
    for step in (0, 20):  # hot and cold
        gates.step = step
        model(**tiny_inputs)
        kept = gates.mask.sum().item()
        assert kept == pytest.approx(round(kept))  # a relaxed subset of a whole number of units
    hard = gates.hardened()
    spent = float((gates.costs * hard).sum())
    assert spent <= gates.budget and gates.budget - spent < float(gates.costs.max())
    remove_head_gates_(model)

    pruned = make_tiny_bert(layers=3)
    prune_heads_(pruned, {i: torch.nonzero(r).flatten().tolist() for i, r in enumerate(hard[:, :4])})
    prune_ffn_(pruned, kept_neurons_from_mask(hard[:, 4:], BLOCK))
    assert flops_per_token(pruned, 128) <= 0.5 * total


def test_flop_budget_below_the_ungated_share_is_refused():
    with pytest.raises(ValueError, match="flops_keep_fraction"):
        add_unit_gates_(make_tiny_bert(), GateConfig(keep=1), block_size=BLOCK, flops_keep_fraction=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        add_unit_gates_(make_tiny_bert(), GateConfig(keep=1), block_size=48, ffn_keep=2)


@pytest.mark.parametrize("budget", [FfnBudget(BLOCK, keep_blocks=5), FfnBudget(BLOCK, flops_keep_fraction=0.4),
                                    FfnBudget(BLOCK, unit_costs=(0.5, 0.2), cost_budget=3.3)],
                         ids=["per-kind", "flops", "unit-costs"])
def test_random_and_dsp_selections_meet_the_budget_and_are_seeded(budget, tiny_inputs):
    labels = torch.tensor([0, 1, 0])

    def train(model, gates):
        optimizer = torch.optim.AdamW(gates.parameters(), lr=0.5)
        model.train()
        for step in range(5):
            gates.step = step
            model(**tiny_inputs, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    for method in ("random", "dsp"):
        runs = [select_heads(method, make_tiny_bert(layers=3), 6, seed=4, ffn=budget, train_gates=train,
                             cooldown_steps=5) for _ in range(2)]
        first, second = runs
        assert torch.equal(first.mask, second.mask) and torch.equal(first.ffn_mask, second.ffn_mask)
        if budget.keep_blocks is not None:
            assert first.mask.sum() == 6 and first.ffn_mask.sum() == 5
        elif budget.cost_budget is not None:
            # 3 layers x (4 heads at 0.5 + 4 blocks at 0.2) cost 8.4; a prefix of one ranking fills 3.3
            # to within the dearest unit, and the selection records the costs it was held to.
            spent = 0.5 * float(first.mask.sum()) + 0.2 * float(first.ffn_mask.sum())
            assert 3.3 - 0.5 < spent <= 3.3 + 1e-9
            assert first.info["ffn"]["unit_costs"] == [0.5, 0.2] and first.info["ffn"]["cost_budget"] == 3.3
        else:
            model = make_tiny_bert(layers=3)
            total = flops_per_token(model, 128)
            prune_heads_(model, {i: torch.nonzero(r).flatten().tolist() for i, r in enumerate(first.mask)})
            prune_ffn_(model, kept_neurons_from_mask(first.ffn_mask, BLOCK))
            assert flops_per_token(model, 128) <= 0.4 * total


def test_methods_without_block_gates_refuse_a_feed_forward_budget():
    with pytest.raises(ValueError, match="feed-forward"):
        select_heads("michel", make_tiny_bert(), 2, ffn=FfnBudget(BLOCK, keep_blocks=2), batches_fn=lambda r: [])


def test_pruned_model_with_an_emptied_layer_exports_and_matches_onnxruntime(tmp_path, tiny_inputs):
    from exporters.onnx import check_parity, default_example, export_onnx

    model = _pruned()
    path = export_onnx(model, tmp_path / "pruned.onnx", example=default_example(batch=2, seq=8))
    assert check_parity(model, path, tiny_inputs, atol=1e-4) <= 1e-4


@pytest.mark.integration
def test_pipeline_prunes_heads_and_blocks_to_a_flop_budget_and_exports(tmp_path):
    """finetune -> harden -> prune -> export on the bundled model with one FLOP budget for heads and blocks."""
    from conftest import GLUE, ROOT
    from pipeline.config import load_config
    from pipeline.run import STAGES, prepare_run_folder

    if not (GLUE / "SST-2").is_dir():
        pytest.skip("needs ../shared/data/glue/SST-2")
    cfg = load_config(ROOT / "configs" / "sst2-minilm-heads-ffn.yaml", [
        f"run_dir={tmp_path / 'run'}", "prune.flops_keep_fraction=0.4",
        f"data.train={GLUE / 'SST-2' / 'train.tsv'}", f"data.dev={GLUE / 'SST-2' / 'dev.tsv'}",
        "data.max_train_examples=32", "data.max_eval_examples=16", "data.max_seq_length=32"])
    folder = prepare_run_folder(cfg)
    for stage in STAGES[:4]:
        folder.run_stage(stage, cfg, log=lambda message: None)
    metrics = json.loads((folder.path / "prune" / "metrics.json").read_text())
    assert metrics["flops_kept_fraction"]["fraction"] <= 0.4
    assert metrics["masked_vs_pruned_max_abs_diff"] <= 1e-4
    assert sum(metrics["ffn_neurons_kept"]) < 6 * 1536 and all(n % 64 == 0 for n in metrics["ffn_neurons_kept"])
    mask = json.loads((folder.path / "harden" / "mask.json").read_text())
    assert mask["ffn"]["blocks_kept"] * 64 == sum(metrics["ffn_neurons_kept"])
    reloaded = load_pruned(folder.path / "prune" / "model")
    assert [p.width for p in feed_forward_parts(reloaded)] == metrics["ffn_neurons_kept"]
    export = json.loads((folder.path / "export" / "metrics.json").read_text())
    assert export["onnx-fp32"]["pruned"]["accuracy"] == pytest.approx(
        json.loads((folder.path / "prune" / "metrics.json").read_text())["pruned"]["accuracy"], abs=1 / 16)


@pytest.mark.parametrize("overrides, message", [
    (["prune.flops_keep_fraction=0.5", "prune.ffn.keep_fraction=0.5"], "cannot be combined with prune.ffn.keep_fraction"),
    (["prune.flops_keep_fraction=0.5", "prune.method=michel"], "prune.method: feed-forward pruning works with"),
    (["prune.ffn.keep_fraction=0.5", "prune.per_layer=true"], "prune.per_layer: feed-forward pruning takes a global"),
    (["prune.flops_keep_fraction=1.5"], "prune.flops_keep_fraction: must be in (0, 1)"),
    (["prune.ffn.block_size=0"], "prune.ffn.block_size: must be a positive number"),
    (["prune.flops_keep_fraction=0.5", "budget.latency_fraction=0.8"],
     "prune.flops_keep_fraction: a latency budget plans the feed-forward blocks itself; remove it and set budget.ffn"),
    (["prune.ffn.head_cost=1", "prune.ffn.cost_budget=3"], "head_cost, block_cost and cost_budget go together"),
    (["prune.ffn.head_cost=1", "prune.ffn.block_cost=1", "prune.ffn.cost_budget=3", "prune.ffn.keep_fraction=0.5"],
     "prune.ffn.cost_budget: 3.0 is one budget for heads and feed-forward blocks"),
    (["prune.ffn.head_cost=-1"], "prune.ffn.head_cost: must be >= 0"),
    (["budget.latency_fraction=0.8", "budget.ffn=true", "prune.method=hardconcrete"],
     "budget.ffn: feed-forward pruning works with dsp, ste, random, got prune.method 'hardconcrete'"),
    (["budget.ffn=true"], "budget.ffn: true plans feed-forward blocks under a latency budget; set one of"),
])
def test_feed_forward_config_errors_name_the_field(overrides, message):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
