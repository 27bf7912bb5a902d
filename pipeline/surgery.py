"""Physical head removal, pruned checkpoints that reload, and counts from real module shapes."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from pipeline.architectures import (
    HeadlessAttention,
    adapter_for,
    attention_parts,
    encoder_layers,
    feed_forward_parts,
    get_path,
    select_position_bias_heads_,
    set_path,
)

# The keys under which a pruned checkpoint's config.json records its kept heads and feed-forward neurons.
KEPT_HEADS_KEY = "dsprune_kept_heads"
KEPT_FFN_KEY = "dsprune_kept_ffn"


class CheckpointError(ValueError):
    """A pruned checkpoint folder that cannot be rebuilt: one line naming the file and the field."""


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data.copy_(bias.index_select(0, index) if dim == 0 else bias)
    new.train(linear.training)
    return new


def _requested(kept: dict, layer: int, count: int, what: str) -> list[int]:
    """The sorted indices ``kept`` lists for ``layer`` (keyed by int or str; all ``count`` when absent)."""
    keep = sorted(set(int(i) for i in kept.get(layer, kept.get(str(layer), range(count)))))
    if any(i < 0 or i >= count for i in keep):
        raise ValueError(f"layer {layer}: {what} {keep} outside 0..{count - 1}")
    return keep


def prune_heads_(model: nn.Module, kept_heads: dict[int, list[int]]) -> nn.Module:
    """Remove every head not listed in ``kept_heads`` from ``model``, in place.

    Slices the q/k/v rows and the output projection's columns of each layer and updates its head
    count. A layer left with no heads gets a :class:`HeadlessAttention` (the output bias, plus the
    LayerNorm where the family's block applies it). Where a family feeds each layer a per-head bias
    computed for all heads (MPNet), the layer selects its kept heads' columns of it.
    Head indices refer to the layer's current heads, so an unpruned model takes original indices.
    The kept heads, in original numbering, are recorded in ``model.config``.

    Args:
        model: a model of a supported family.
        kept_heads: {layer index: head indices to keep}; layers not listed keep all their heads.
    """
    adapter = adapter_for(model)
    layers = encoder_layers(model)
    previous = current_kept_heads(model)
    for part in attention_parts(model):
        keep = _requested(kept_heads, part.layer, part.num_heads, "head indices")
        if len(keep) == part.num_heads:
            continue
        previous[part.layer] = [previous[part.layer][h] for h in keep]
        layer = layers[part.layer]
        if not keep:
            layer_norm = get_path(part.block, adapter.layer_norm) if adapter.layer_norm else None
            set_path(layer, adapter.attention, HeadlessAttention(part.output.bias, layer_norm))
            continue
        rows = torch.tensor([h * part.head_dim + d for h in keep for d in range(part.head_dim)],
                            device=part.query.weight.device)
        set_path(part.block, adapter.query, _slice_linear(part.query, rows, 0))
        set_path(part.block, adapter.key, _slice_linear(part.key, rows, 0))
        set_path(part.block, adapter.value, _slice_linear(part.value, rows, 0))
        set_path(part.block, adapter.output, _slice_linear(part.output, rows, 1))
        heads_module = get_path(part.block, adapter.heads_module)
        setattr(heads_module, adapter.head_count_attr, len(keep))
        if adapter.all_head_size_attr:
            setattr(heads_module, adapter.all_head_size_attr, len(keep) * part.head_dim)
        if adapter.position_bias_arg:
            select_position_bias_heads_(heads_module, adapter.position_bias_arg, previous[part.layer])
    setattr(model.config, KEPT_HEADS_KEY, {str(k): v for k, v in sorted(previous.items())})
    return model


def prune_ffn_(model: nn.Module, kept_neurons: dict[int, list[int]]) -> nn.Module:
    """Remove every feed-forward intermediate neuron not listed in ``kept_neurons``, in place.

    Slices the rows of each layer's first feed-forward linear and the columns of its second. A layer
    left with no neurons keeps one dead neuron (zero weights and bias in, zero weights out): its block
    then returns the second linear's bias whatever the activation, exactly what the masked model
    computes, with no zero-width tensors (exported ONNX graphs reject them). A layer with no heads and
    no neurons does no matrix products at all; its LayerNorms and biases stay, because a post-LN layer
    without them is not the identity the masked model computes. Neuron indices refer to the layer's
    current neurons; the kept neurons, in original numbering, are recorded in ``model.config``.

    Args:
        model: a model of a supported family.
        kept_neurons: {layer index: neuron indices to keep}; layers not listed keep all their neurons.
    """
    adapter = adapter_for(model)
    layers = encoder_layers(model)
    previous = current_kept_ffn(model)
    for part in feed_forward_parts(model):
        keep = _requested(kept_neurons, part.layer, part.width, "feed-forward neurons")
        if len(keep) == part.width:
            continue
        previous[part.layer] = [previous[part.layer][n] for n in keep]
        layer = layers[part.layer]
        if keep:
            index = torch.tensor(keep, device=part.input.weight.device)
            set_path(layer, adapter.ffn_in, _slice_linear(part.input, index, 0))
            set_path(layer, adapter.ffn_out, _slice_linear(part.output, index, 1))
            continue
        dead = torch.zeros(1, dtype=torch.long, device=part.input.weight.device)
        first, second = _slice_linear(part.input, dead, 0), _slice_linear(part.output, dead, 1)
        with torch.no_grad():
            first.weight.zero_()
            first.bias.zero_()
            second.weight.zero_()
        set_path(layer, adapter.ffn_in, first)
        set_path(layer, adapter.ffn_out, second)
    setattr(model.config, KEPT_FFN_KEY, {str(k): v for k, v in sorted(previous.items())})
    return model


def current_kept_ffn(model: nn.Module) -> dict[int, list[int]]:
    """Kept feed-forward neurons per layer in original numbering (all of them for an unpruned model)."""
    recorded = getattr(model.config, KEPT_FFN_KEY, None)
    if recorded:
        return {int(k): list(v) for k, v in recorded.items()}
    return {p.layer: list(range(p.width)) for p in feed_forward_parts(model)}


def current_kept_heads(model: nn.Module) -> dict[int, list[int]]:
    """Kept heads per layer in original numbering (all heads for an unpruned model)."""
    recorded = getattr(model.config, KEPT_HEADS_KEY, None)
    if recorded:
        return {int(k): list(v) for k, v in recorded.items()}
    return {layer: list(range(model.config.num_attention_heads)) for layer in range(model.config.num_hidden_layers)}


def _atomic_dir(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def save_pruned(model: nn.Module, path, tokenizer=None, *, processor=None) -> Path:
    """Write ``model`` (pruned or not) as safetensors + config.json (+ tokenizer/processor) to ``path``, atomically.

    The config records the kept heads, so :func:`load_pruned` (or anyone reading config.json)
    can rebuild the shapes without dsprune's run folder. The weights keep the model's own state-dict
    names (transformers 5 would otherwise write some families, ViT among them, under their
    pre-5 names), so a reload is a plain ``load_state_dict`` and shape errors name real modules.

    Args:
        model: the model to write; head gates must be removed first.
        path: the folder to (re)place.
        tokenizer: saved beside the weights when given (text models).
        processor: an image processor (or any object with ``save_pretrained``), saved when given.
    """
    path = Path(path)
    if hasattr(model, "head_gates"):
        raise ValueError("remove the head gates (remove_head_gates_) before saving")
    if getattr(model.config, KEPT_HEADS_KEY, None) is None:
        setattr(model.config, KEPT_HEADS_KEY, {str(k): v for k, v in current_kept_heads(model).items()})
    tmp = _atomic_dir(path)
    try:
        model.save_pretrained(tmp, safe_serialization=True, save_original_format=False)
        for extra in (tokenizer, processor):
            if extra is not None:
                extra.save_pretrained(tmp)
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


# The Auto class that rebuilds each task head, by the suffix of the saved config's architectures.
_AUTO_CLASSES = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForImageClassification": "AutoModelForImageClassification",
}


def _auto_class(config, config_path: Path):
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return transformers.AutoModelForSequenceClassification
    for suffix, auto_name in _AUTO_CLASSES.items():
        if architectures[0].endswith(suffix):
            return getattr(transformers, auto_name)
    raise CheckpointError(
        f"{config_path}: architectures {architectures} has no loader; supported: "
        f"{', '.join('*' + s for s in _AUTO_CLASSES)} (or pass model_class)"
    )


def load_pruned(path, *, attn_implementation: str | None = None, model_class=None) -> nn.Module:
    """Rebuild a checkpoint written by :func:`save_pruned` and load its weights, nothing missing.

    The model class comes from the saved config's ``architectures`` (``AutoModelForSequenceClassification``
    for ``*ForSequenceClassification`` or when absent, ``AutoModelForImageClassification`` for
    ``*ForImageClassification``) unless ``model_class`` says otherwise; the kept heads in config.json
    give the shapes.

    Raises:
        CheckpointError: missing files, an architecture with no loader, or weights whose shapes
            disagree with the recorded heads.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    weights = path / "model.safetensors"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: missing")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (only safetensors weights are loaded)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model_class = model_class or _auto_class(config, path / "config.json")
    model = model_class.from_config(config)
    kept = getattr(config, KEPT_HEADS_KEY, None)
    if kept:
        setattr(model.config, KEPT_HEADS_KEY, None)
        prune_heads_(model, {int(k): v for k, v in kept.items()})
    kept_ffn = getattr(config, KEPT_FFN_KEY, None)
    if kept_ffn:
        setattr(model.config, KEPT_FFN_KEY, None)
        prune_ffn_(model, {int(k): v for k, v in kept_ffn.items()})
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
    _check_shapes(model, state, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing {missing[:3]} unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _check_shapes(model, state, path) -> None:
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            layer = next((p for p in key.split(".") if p.isdigit()), "?")
            adapter = adapter_for(model)
            ffn = any(f".{layer}.{p}." in key for p in (adapter.ffn_in, adapter.ffn_out))
            field = KEPT_FFN_KEY if ffn else KEPT_HEADS_KEY
            raise CheckpointError(
                f"{path / 'config.json'}: {field} for layer {layer} gives {key} shape "
                f"{tuple(expected[key].shape)}, but the weights have {tuple(tensor.shape)}"
            )


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model proper (gates excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head_gates."))


def _conv_macs(conv: nn.Conv2d, config) -> int:
    """MACs of one pass of a patch-embedding convolution over the model's fixed input image."""
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    out_h = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    out_w = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
    per_position = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    return out_h * out_w * per_position


def default_sequence_length(model: nn.Module) -> int:
    """128 tokens for text; for vision models the fixed patch count plus the [CLS] token."""
    config = model.config
    if getattr(config, "image_size", None) and getattr(config, "patch_size", None):
        size, patch = config.image_size, config.patch_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return (height // ph) * (width // pw) + 1
    return 128


def flops_per_token(model: nn.Module, seq: int | None = None) -> int:
    """Multiply-accumulate FLOPs (2 per MAC) per token of one forward pass at sequence length ``seq``.

    Counts every ``nn.Linear`` of the base model but its pooler (encoder layers, and ELECTRA's
    per-token embedding projection) from its actual shape, plus the attention score and weighted-sum
    products (2 * seq * kept_heads * head_dim MACs per token per layer). Embedding lookups,
    LayerNorm, softmax, activations, the dead neuron of an emptied feed-forward block and MPNet's
    relative-position-bias additions are ignored (a few
    percent at most). The pooler and the task head run once per sequence (they read [CLS]), and so
    does ViT's patch convolution over the whole image; those are divided by ``seq``.

    Args:
        model: a model of a supported family, pruned or not.
        seq: tokens per sequence; None for :func:`default_sequence_length` (128 for text, the
            patch count + 1 for ViT, whose image size is fixed).
    """
    seq = seq or default_sequence_length(model)
    # Everything in the base model runs per token except its pooler; task heads run per sequence.
    pooler = getattr(model.base_model, "pooler", None)
    pooled = {id(m) for m in pooler.modules()} if pooler is not None else set()
    per_token_ids = {id(m) for m in model.base_model.modules() if id(m) not in pooled}
    # An emptied feed-forward block keeps one dead neuron whose output is a constant: no work counted.
    dead = {id(m) for p in feed_forward_parts(model) if p.width == 0 for m in (p.input, p.output)}
    total = 0
    per_sequence = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in dead:
            macs = module.in_features * module.out_features
            if id(module) in per_token_ids:
                total += 2 * macs
            else:
                per_sequence += 2 * macs
        elif isinstance(module, nn.Conv2d):
            per_sequence += 2 * _conv_macs(module, model.config)
    for part in attention_parts(model):
        total += 2 * 2 * seq * part.num_heads * part.head_dim
    return total + per_sequence // seq


def unit_flops(model: nn.Module, block_size: int, seq: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLOPs per token of each head and each feed-forward block of an unpruned model, as
    :func:`flops_per_token` counts them: removing a unit saves exactly its cost (biases aside).

    A head costs its q/k/v rows and output-projection columns plus its attention scores and weighted
    sum (2 * seq * head_dim MACs); a block of ``block_size`` neurons its rows of the first feed-forward
    linear and columns of the second.

    Returns:
        (layers, heads) and (layers, width // block_size) float64 tensors.
    """
    seq = seq or default_sequence_length(model)
    heads = torch.tensor([[2.0 * ((p.query.in_features + p.key.in_features + p.value.in_features) * p.head_dim
                                  + p.head_dim * p.output.out_features + 2 * seq * p.head_dim)] * p.num_heads
                          for p in attention_parts(model)], dtype=torch.float64)
    blocks = torch.tensor([[2.0 * block_size * (p.input.in_features + p.output.out_features)] * (p.width // block_size)
                           for p in feed_forward_parts(model)], dtype=torch.float64)
    return heads, blocks
