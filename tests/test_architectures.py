"""Every supported family, built tiny and random: gates train, pruned equals masked, exact reload,
ONNX parity on an untraced shape, and parameter/FLOP counts that match a hand count."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from exporters.onnx import check_parity, default_image_example, export_onnx
from pipeline.architectures import ADAPTERS, HeadlessAttention, UnsupportedModelError, adapter_for, attention_parts
from pipeline.gates import GateConfig, add_fixed_mask_, add_head_gates_
from pipeline.surgery import (
    CheckpointError,
    count_parameters,
    flops_per_token,
    load_pruned,
    prune_heads_,
    save_pruned,
)

FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "vit")
HIDDEN, HEADS, LAYERS, LABELS, VOCAB = 32, 4, 3, 3, 100
HEAD_DIM = HIDDEN // HEADS
KEPT = {0: [0, 2], 1: [], 2: [1, 2, 3]}  # uneven, with one emptied layer
KEPT_RECORD = {"0": [0, 2], "1": [], "2": [1, 2, 3]}
REMOVED_HEADS = LAYERS * HEADS - 5
# Ten times the usual 0.02, so that logits are O(0.1-1) and a 1e-5 tolerance is tight, not vacuous.
INIT = 0.2


def make_tiny(model_type: str, layers: int = LAYERS, seed: int = 0):
    """A random classifier of ``model_type``: hidden 32, 4 heads, no dropout, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=LABELS, initializer_range=INIT)
    if model_type == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**text))
    elif model_type == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **text))
    elif model_type == "xlm-roberta":
        model = tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(pad_token_id=1, **text))
    elif model_type == "electra":
        # embedding_size != hidden_size exercises ELECTRA's per-token embedding projection.
        model = tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **text))
    elif model_type == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=2 * HIDDEN,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
            num_labels=LABELS, initializer_range=INIT))
    elif model_type == "mpnet":
        model = tf.MPNetForSequenceClassification(tf.MPNetConfig(pad_token_id=1, **text))
    elif model_type == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
            intermediate_size=2 * HIDDEN, image_size=32, patch_size=8, num_channels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=LABELS, initializer_range=INIT))
    else:
        raise KeyError(model_type)
    return model.eval()


def make_inputs(model_type: str, batch: int = 3, seq: int = 11, seed: int = 1, padded: bool = True):
    g = torch.Generator().manual_seed(seed)
    if model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)  # above every family's special ids
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, seq - 4:] = 0  # padding must not change the answer
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


def logits(model, inputs):
    accepted = inspect.signature(model.forward).parameters
    return model(**{k: v for k, v in inputs.items() if k in accepted}).logits


def mask_of(kept, layers=LAYERS, heads=HEADS):
    mask = torch.zeros(layers, heads, dtype=torch.float64)
    for layer, hs in kept.items():
        mask[layer, hs] = 1
    return mask


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gates_install_and_a_training_step_moves_the_logits(model_type):
    model = make_tiny(model_type)
    inputs = make_inputs(model_type)
    with torch.no_grad():
        before = logits(model, inputs)
    gates = add_head_gates_(model, GateConfig(keep=6, cooldown_steps=10))
    assert gates.logits.shape == (LAYERS, HEADS)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(logits(model, inputs), torch.tensor([0, 1, 2]))
    loss.backward()
    assert gates.logits.grad is not None and gates.logits.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (logits(model, inputs) - before).abs().max() > 1e-4


# MPNet has a single eager attention; the others run sdpa by default and eager on request.
ATTENTION_VARIANTS = [(t, a) for t in FAMILIES for a in ("sdpa", "eager") if not (t == "mpnet" and a == "sdpa")]


@pytest.mark.parametrize(("model_type", "attn"), ATTENTION_VARIANTS)
def test_pruned_equals_masked(model_type, attn):
    inputs = make_inputs(model_type)
    masked = make_tiny(model_type)
    masked.config._attn_implementation = attn
    add_fixed_mask_(masked, mask_of(KEPT))
    pruned = make_tiny(model_type)
    pruned.config._attn_implementation = attn
    prune_heads_(pruned, KEPT)
    with torch.no_grad():
        diff = (logits(masked, inputs) - logits(pruned, inputs)).abs().max().item()
    assert diff <= 1e-5
    assert [p.num_heads for p in attention_parts(pruned)] == [2, 0, 3]
    assert isinstance(attention_parts(pruned)[1].block, HeadlessAttention)
    assert pruned.config.dsprune_kept_heads == KEPT_RECORD
    # The removed heads mattered: the unpruned model answers differently, so 1e-5 is a real check.
    with torch.no_grad():
        assert (logits(make_tiny(model_type), inputs) - logits(pruned, inputs)).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruning_twice_keeps_original_numbering(model_type):
    inputs = make_inputs(model_type)
    model = prune_heads_(make_tiny(model_type), KEPT)
    prune_heads_(model, {0: [1], 2: [0, 2]})  # indices into the current heads
    assert model.config.dsprune_kept_heads == {"0": [2], "1": [], "2": [1, 3]}
    reference = make_tiny(model_type)
    add_fixed_mask_(reference, mask_of({0: [2], 1: [], 2: [1, 3]}))
    with torch.no_grad():
        assert (logits(model, inputs) - logits(reference, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_load_round_trip_is_exact(model_type, tmp_path):
    inputs = make_inputs(model_type)
    model = prune_heads_(make_tiny(model_type), KEPT)
    processor = None
    if model_type == "vit":
        from transformers import ViTImageProcessorPil

        processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    save_pruned(model, tmp_path / "m", processor=processor)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dsprune_kept_heads"] == KEPT_RECORD
    assert (tmp_path / "m" / "preprocessor_config.json").is_file() == (processor is not None)
    reloaded = load_pruned(tmp_path / "m")
    assert type(reloaded) is type(model)
    expected, got = model.state_dict(), reloaded.state_dict()
    assert list(expected) == list(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    with torch.no_grad():
        assert torch.equal(logits(model, inputs), logits(reloaded, inputs))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_model_exports_with_parity_on_an_untraced_shape(model_type, tmp_path):
    model = prune_heads_(make_tiny(model_type), KEPT)
    if model_type == "vit":
        example, untraced = None, make_inputs(model_type, batch=3)  # traces default_image_example: batch 2
        assert default_image_example(model.config)["pixel_values"].shape[0] == 2
    else:
        example, untraced = make_inputs(model_type, batch=2, seq=8, padded=False), make_inputs(model_type)
    path = export_onnx(model, tmp_path / "m.onnx", example=example)
    assert check_parity(model, path, untraced, atol=1e-4) <= 1e-4


@pytest.mark.parametrize("model_type", FAMILIES)
def test_parameters_removed_are_removed_heads_times_per_head(model_type):
    model = make_tiny(model_type)
    before = count_parameters(model)
    prune_heads_(model, KEPT)
    # Each removed head loses its q/k/v rows with their biases and its o columns (o's bias is
    # shared by all heads and stays). MPNet's relative position bias table (32 buckets x heads) is
    # shared by all layers and is indexed per layer rather than sliced, so it loses nothing.
    per_head = 3 * (HIDDEN * HEAD_DIM + HEAD_DIM) + HIDDEN * HEAD_DIM
    assert before - count_parameters(model) == REMOVED_HEADS * per_head


@pytest.mark.parametrize("model_type", FAMILIES)
def test_flops_removed_are_removed_heads_times_per_head(model_type):
    seq = 16
    model = make_tiny(model_type)
    before = flops_per_token(model, seq)
    prune_heads_(model, KEPT)
    per_head = 4 * 2 * HIDDEN * HEAD_DIM + 2 * 2 * seq * HEAD_DIM
    assert before - flops_per_token(model, seq) == REMOVED_HEADS * per_head


def test_flops_hand_count_electra_and_vit():
    h, i, layers = HIDDEN, 2 * HIDDEN, LAYERS
    per_layer = lambda seq: 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq * h  # noqa: E731
    # ELECTRA projects its 16-wide embeddings to the hidden size for every token; its
    # classification head (dense + out_proj) runs on [CLS] once per sequence.
    seq = 16
    assert flops_per_token(make_tiny("electra"), seq) == (
        layers * per_layer(seq) + 2 * 16 * h + 2 * (h * h + h * LABELS) // seq)
    # ViT: 16 patches + [CLS] by default; the patch convolution and the classifier once per image.
    seq = 17
    per_image = 2 * 16 * (3 * 8 * 8 * h) + 2 * h * LABELS
    assert flops_per_token(make_tiny("vit")) == layers * per_layer(seq) + per_image // seq


@pytest.mark.parametrize("model_type", ["distilbert", "mpnet", "vit"])
def test_load_refuses_kept_heads_that_disagree_with_weights(model_type, tmp_path):
    save_pruned(prune_heads_(make_tiny(model_type), KEPT), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["dsprune_kept_heads"]["2"] = [0, 1]  # the weights hold 3 heads there
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layer 2 gives \S+ shape \(16,.*\), but the weights have \(24,"):
        load_pruned(tmp_path / "m")


def test_load_refuses_an_architecture_it_cannot_rebuild(tmp_path):
    save_pruned(make_tiny("distilbert"), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["DistilBertForMaskedLM"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="DistilBertForMaskedLM.*ForSequenceClassification"):
        load_pruned(tmp_path / "m")


def test_mpnet_keeps_its_shared_relative_bias_whole_and_selects_kept_heads():
    model = prune_heads_(make_tiny("mpnet"), KEPT)
    assert model.mpnet.encoder.relative_attention_bias.weight.shape == (32, HEADS)
    layer2 = model.mpnet.encoder.layer[2].attention.attn
    assert layer2.dsprune_position_bias_heads.tolist() == [1, 2, 3]
    assert layer2.num_attention_heads == 3 and layer2.all_head_size == 3 * HEAD_DIM
    assert not any("dsprune" in key for key in model.state_dict())


def test_head_count_attributes_follow_the_slices():
    distilbert = prune_heads_(make_tiny("distilbert"), KEPT)
    assert distilbert.distilbert.transformer.layer[2].attention.n_heads == 3
    vit = prune_heads_(make_tiny("vit"), KEPT)
    assert vit.vit.layers[0].attention.num_attention_heads == 2


def test_every_family_has_an_adapter_and_the_error_lists_them():
    assert set(FAMILIES) <= set(ADAPTERS)
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10))
    with pytest.raises(UnsupportedModelError, match="bert, distilbert, electra, mpnet, roberta, vit, xlm-roberta"):
        adapter_for(model)
