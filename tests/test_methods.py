"""Every head-selection method keeps exactly K heads, is seeded, and finds heads that carry a planted signal."""
import json
import pytest
import torch

from conftest import make_tiny_bert, silence_heads_
from pipeline.gates import add_fixed_mask_
from pipeline.methods import (
    METHODS,
    HardConcreteConfig,
    add_hardconcrete_gates_,
    michel_importance,
    random_mask,
    select_heads,
)
from pipeline.gates import remove_head_gates_

# The planted task: label = "token 10 occurs after [CLS]". The classifier reads [CLS], which learns
# about the other tokens only through attention, and every head but these two has zero value
# weights, so only they can carry the signal.
PLANTED = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
GATE_LR = {"dsp": 0.5, "ste": 0.5, "hardconcrete": 0.1}
GATE_OPTIONS = {"dsp": {"cooldown_steps": 50}, "ste": {}, "hardconcrete": {"penalty": 0.05}}


def planted_batch(generator, n=32, seq=8):
    ids = torch.randint(10, 20, (n, seq), generator=generator)
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": (ids[:, 1:] == 10).any(1).long()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds contention on the shared 2-core machine (10x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    handles = add_fixed_mask_(model, PLANTED.float())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        model(**planted_batch(generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for handle in handles:
        handle.remove()
    silence_heads_(model, PLANTED)
    model.eval()
    held_out = [planted_batch(torch.Generator().manual_seed(5), 64)]
    with torch.no_grad():
        logits = model(**held_out[0]).logits
    assert (logits.argmax(-1) == held_out[0]["labels"]).float().mean() > 0.95  # the task is learned
    return model


def pipelined_trainer(method, steps=100):
    """Gates only (weights frozen), as in pipelined pruning."""

    def train(model, gates):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in gates.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(list(gates.parameters()), lr=GATE_LR[method], weight_decay=0.0)
        generator = torch.Generator().manual_seed(1)
        model.train()
        for step in range(steps):
            gates.step = step
            model(**planted_batch(generator)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()

    return train


def planted_batches(round_):
    generator = torch.Generator().manual_seed(100 + round_)
    return [planted_batch(generator) for _ in range(4)]


def run_method(method, model, keep, per_layer=False, seed=0, steps=100):
    return select_heads(method, model, keep, per_layer=per_layer, seed=seed,
                        train_gates=pipelined_trainer(method, steps) if method in GATE_LR else None,
                        batches_fn=planted_batches, **GATE_OPTIONS.get(method, {}))


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per-layer"])
@pytest.mark.parametrize("method", ["dsp", "ste", "hardconcrete", "michel", "michel-iterative"])
def test_learned_methods_keep_the_planted_heads(planted_model, method, per_layer):
    selection = run_method(method, planted_model, 2, per_layer=per_layer)
    assert torch.equal(selection.mask, PLANTED), selection.mask.int().tolist()


def test_only_planted_heads_matter(planted_model):
    """Guards the planted test itself: dropping a planted head costs loss, dropping the rest costs none."""
    batch = planted_batch(torch.Generator().manual_seed(9), 128)

    def loss(mask):
        handles = add_fixed_mask_(planted_model, mask.float())
        with torch.no_grad():
            value = planted_model(**batch).loss.item()
        for handle in handles:
            handle.remove()
        return value

    assert loss(PLANTED) == pytest.approx(loss(torch.ones(2, 4)), abs=1e-6)
    without_first = PLANTED.clone()
    without_first[0, 1] = False
    assert loss(without_first) > loss(PLANTED) + 0.5


def test_michel_importance_is_zero_for_dead_heads_and_layer_normalized(planted_model):
    raw = michel_importance(planted_model, planted_batches(0), normalize_layers=False)
    assert (raw[~PLANTED] == 0).all() and (raw[PLANTED] > 0).all()
    importance = michel_importance(planted_model, planted_batches(0))
    # One live head per layer: each layer's L2 normalization gives it 1 before the global min-max.
    assert importance[PLANTED].tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per-layer"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_exactly_k_and_is_seeded(method, per_layer):
    keep = 6  # of 8 heads; 3 per layer with the per-layer budget
    masks = []
    for _ in range(2):
        model = make_tiny_bert()
        masks.append(run_method(method, model, keep, per_layer=per_layer, seed=3, steps=4).mask)
    assert masks[0].dtype == torch.bool and masks[0].shape == (2, 4)
    assert int(masks[0].sum()) == keep
    if per_layer:
        assert masks[0].sum(1).tolist() == [3, 3]
    assert torch.equal(masks[0], masks[1])


def test_michel_iterative_removes_in_steps_until_exactly_k():
    model = make_tiny_bert()
    rounds = []

    def batches_fn(round_):
        rounds.append(round_)
        return planted_batches(round_)

    mask = select_heads("michel-iterative", model, 3, batches_fn=batches_fn, step_fraction=0.25).mask
    assert int(mask.sum()) == 3
    assert rounds == [0, 1, 2]  # 8 -> 6 -> 4 -> 3 heads, re-estimated each round


def test_random_mask_depends_on_the_seed():
    masks = {tuple(random_mask(6, 12, 36, seed).flatten().tolist()) for seed in range(5)}
    assert len(masks) == 5
    assert random_mask(6, 12, 36, 0, per_layer=True).sum(1).tolist() == [6] * 6


def test_hardconcrete_penalty_enters_the_training_loss_only(tiny_inputs):
    model = make_tiny_bert()
    labels = torch.tensor([0, 1, 0])
    gates = add_hardconcrete_gates_(model, HardConcreteConfig(keep=3, penalty=2.0))
    assert gates.log_a.abs().max() <= (6 / 5) ** 0.5  # Xavier bound of a [1, 4, 1, 1] gate
    model.eval()
    with torch.no_grad():
        eval_loss = model(**tiny_inputs, labels=labels).loss
        assert torch.equal(gates.mask, gates.deterministic_gates())
    model.train()
    train_out = model(**tiny_inputs, labels=labels)
    assert ((gates.mask == 0) | (gates.mask == 1) | ((gates.mask > 0) & (gates.mask < 1))).all()
    train_out.loss.backward()
    assert gates.log_a.grad is not None and (gates.log_a.grad != 0).all()
    remove_head_gates_(model)
    model.train()
    plain = model(**tiny_inputs, labels=labels).loss
    # Without dropout the training forward differs from eval only by the gate sample and the penalty.
    assert train_out.loss.item() > plain.item() + 2.0 * 8 * 0.1
    assert eval_loss.item() != train_out.loss.item()


def test_methods_refuse_impossible_budgets():
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="divisible"):
        select_heads("random", model, 3, per_layer=True)
    with pytest.raises(ValueError, match="keep must be"):
        select_heads("random", model, 9)
    with pytest.raises(ValueError, match="method must be one of"):
        select_heads("magnitude", model, 2)
    with pytest.raises(ValueError, match="train_gates"):
        select_heads("dsp", model, 2)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["michel-iterative", "hardconcrete", "random"])
def test_pipeline_stages_run_every_method_to_exactly_k(method, tmp_path):
    """The finetune and harden stages dispatch on prune.method and end with exactly K heads."""
    from conftest import finetune_and_harden

    run = finetune_and_harden(tmp_path, f"prune.method={method}", "prune.keep=18")
    mask = json.loads((run / "harden" / "mask.json").read_text())
    assert sum(len(v) for v in mask["kept_heads"].values()) == 18
    gates = json.loads((run / "finetune" / "gates.json").read_text())
    assert gates["method"] == method
    if method == "hardconcrete":
        assert "penalty_keeps" in gates["info"]
