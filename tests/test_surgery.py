"""Head surgery: pruned equals masked, exact reload, counts from shapes, bad checkpoints refused."""
import json

import pytest
import torch

from conftest import make_tiny_bert
from pipeline.architectures import HeadlessAttention, UnsupportedModelError, adapter_for, attention_parts
from pipeline.gates import add_fixed_mask_
from pipeline.surgery import (
    CheckpointError,
    count_parameters,
    flops_per_token,
    load_pruned,
    prune_heads_,
    save_pruned,
)

KEPT = {0: [0, 2], 1: [], 2: [1, 2, 3]}  # uneven, with one emptied layer


def _mask(kept, layers=3, heads=4):
    mask = torch.zeros(layers, heads, dtype=torch.float64)
    for layer, hs in kept.items():
        mask[layer, hs] = 1
    return mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pruned_equals_masked(attn, tiny_inputs):
    masked = make_tiny_bert(layers=3)
    masked.config._attn_implementation = attn
    add_fixed_mask_(masked, _mask(KEPT))
    pruned = make_tiny_bert(layers=3)
    pruned.config._attn_implementation = attn
    prune_heads_(pruned, KEPT)
    with torch.no_grad():
        diff = (masked(**tiny_inputs).logits - pruned(**tiny_inputs).logits).abs().max().item()
    assert diff <= 1e-5
    assert [p.num_heads for p in attention_parts(pruned)] == [2, 0, 3]
    assert isinstance(attention_parts(pruned)[1].block, HeadlessAttention)
    assert pruned.config.dsprune_kept_heads == {"0": [0, 2], "1": [], "2": [1, 2, 3]}


def test_pruning_twice_keeps_original_numbering(tiny_inputs):
    model = make_tiny_bert(layers=3)
    prune_heads_(model, KEPT)
    prune_heads_(model, {0: [1], 2: [0, 2]})  # indices into the current heads
    assert model.config.dsprune_kept_heads == {"0": [2], "1": [], "2": [1, 3]}
    reference = make_tiny_bert(layers=3)
    add_fixed_mask_(reference, _mask({0: [2], 1: [], 2: [1, 3]}))
    with torch.no_grad():
        assert torch.allclose(model(**tiny_inputs).logits, reference(**tiny_inputs).logits, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path, tiny_inputs, tokenizer):
    model = make_tiny_bert(layers=3)
    prune_heads_(model, KEPT)
    save_pruned(model, tmp_path / "pruned", tokenizer)
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["dsprune_kept_heads"] == {"0": [0, 2], "1": [], "2": [1, 2, 3]}
    reloaded = load_pruned(tmp_path / "pruned", attn_implementation=model.config._attn_implementation)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(**tiny_inputs).logits, reloaded(**tiny_inputs).logits)


def test_load_refuses_kept_heads_that_disagree_with_weights(tmp_path):
    model = make_tiny_bert(layers=3)
    prune_heads_(model, KEPT)
    save_pruned(model, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["dsprune_kept_heads"]["2"] = [0, 1]  # the weights hold 3 heads there
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer 2"):
        load_pruned(tmp_path / "m")


def test_load_refuses_missing_and_corrupt_weights(tmp_path):
    save_pruned(make_tiny_bert(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_pruned(tmp_path / "m")
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_pruned(tmp_path / "m")


def test_save_is_atomic_and_replaces(tmp_path):
    save_pruned(make_tiny_bert(seed=1), tmp_path / "m")
    model = make_tiny_bert(seed=2)
    save_pruned(model, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left behind
    reloaded = load_pruned(tmp_path / "m")
    assert torch.equal(reloaded.classifier.weight, model.classifier.weight)


def test_parameter_and_flop_counts_from_shapes():
    hidden, heads, layers, seq = 32, 4, 3, 16
    head_dim = hidden // heads
    model = make_tiny_bert(layers=layers)
    before_params = count_parameters(model)
    before_flops = flops_per_token(model, seq)
    prune_heads_(model, KEPT)
    removed_heads = layers * heads - (2 + 0 + 3)  # 7 of 12 heads
    # Each removed head loses q/k/v rows (3 * (hidden * head_dim + head_dim)) and o columns (hidden * head_dim).
    per_head_params = 3 * (hidden * head_dim + head_dim) + hidden * head_dim
    assert before_params - count_parameters(model) == removed_heads * per_head_params
    # Per token: 4 projections * 2 * hidden * head_dim, plus 2 * 2 * seq * head_dim for scores and weighted sum.
    per_head_flops = 4 * 2 * hidden * head_dim + 2 * 2 * seq * head_dim
    assert before_flops - flops_per_token(model, seq) == removed_heads * per_head_flops


def test_minilm_flops_hand_count(bundled_model_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(bundled_model_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    h, i, layers, seq = 384, 1536, 6, 128
    per_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq * h
    per_sequence = 2 * (h * h + h * 2)  # pooler + classifier, once per sequence
    assert flops_per_token(model, seq) == layers * per_layer + per_sequence // seq


def test_unsupported_model_type_lists_supported():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10))
    with pytest.raises(UnsupportedModelError, match="supported: bert"):
        adapter_for(model)
