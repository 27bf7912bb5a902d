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
    get_path,
    set_path,
)

# The key under which a pruned checkpoint's config.json records its kept heads.
KEPT_HEADS_KEY = "dsprune_kept_heads"


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


def prune_heads_(model: nn.Module, kept_heads: dict[int, list[int]]) -> nn.Module:
    """Remove every head not listed in ``kept_heads`` from ``model``, in place.

    Slices the q/k/v rows and the output projection's columns of each layer and updates its head
    count. A layer left with no heads gets a :class:`HeadlessAttention` (output bias + LayerNorm).
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
        keep = sorted(set(int(h) for h in kept_heads.get(part.layer, kept_heads.get(str(part.layer), range(part.num_heads)))))
        if any(h < 0 or h >= part.num_heads for h in keep):
            raise ValueError(f"layer {part.layer}: head indices {keep} outside 0..{part.num_heads - 1}")
        if len(keep) == part.num_heads:
            continue
        previous[part.layer] = [previous[part.layer][h] for h in keep]
        layer = layers[part.layer]
        if not keep:
            set_path(layer, adapter.attention,
                     HeadlessAttention(part.output.bias, get_path(part.block, adapter.layer_norm)))
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
    setattr(model.config, KEPT_HEADS_KEY, {str(k): v for k, v in sorted(previous.items())})
    return model


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


def save_pruned(model: nn.Module, path, tokenizer=None) -> Path:
    """Write ``model`` (pruned or not) as safetensors + config.json (+ tokenizer) to ``path``, atomically.

    The config records the kept heads, so :func:`load_pruned` (or anyone reading config.json)
    can rebuild the shapes without dsprune's run folder.
    """
    path = Path(path)
    if hasattr(model, "head_gates"):
        raise ValueError("remove the head gates (remove_head_gates_) before saving")
    if getattr(model.config, KEPT_HEADS_KEY, None) is None:
        setattr(model.config, KEPT_HEADS_KEY, {str(k): v for k, v in current_kept_heads(model).items()})
    tmp = _atomic_dir(path)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_pruned(path, *, attn_implementation: str | None = None, model_class=None) -> nn.Module:
    """Rebuild a checkpoint written by :func:`save_pruned` and load its weights, nothing missing.

    The model class comes from the saved config (``AutoModelForSequenceClassification`` unless
    ``model_class`` says otherwise); the kept heads in config.json give the shapes.

    Raises:
        CheckpointError: missing files, or weights whose shapes disagree with the recorded heads.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    weights = path / "model.safetensors"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: missing")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (only safetensors weights are loaded)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model_class = model_class or AutoModelForSequenceClassification
    model = model_class.from_config(config)
    kept = getattr(config, KEPT_HEADS_KEY, None)
    if kept:
        setattr(model.config, KEPT_HEADS_KEY, None)
        prune_heads_(model, {int(k): v for k, v in kept.items()})
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
            raise CheckpointError(
                f"{path / 'config.json'}: {KEPT_HEADS_KEY} for layer {layer} gives {key} shape "
                f"{tuple(expected[key].shape)}, but the weights have {tuple(tensor.shape)}"
            )


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model proper (gates excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head_gates."))


def flops_per_token(model: nn.Module, seq: int = 128) -> int:
    """Multiply-accumulate FLOPs (2 per MAC) per token of one forward pass at sequence length ``seq``.

    Counts every ``nn.Linear`` in the encoder from its actual shape, plus the attention score and
    weighted-sum products (2 * seq * kept_heads * head_dim MACs per token per layer). Embedding
    lookups, LayerNorm, softmax and activations are ignored (a few percent at most); the pooler and
    classifier run once per sequence and are divided by ``seq``.
    """
    total = 0
    for layer in encoder_layers(model):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                total += 2 * module.in_features * module.out_features
    for part in attention_parts(model):
        total += 2 * 2 * seq * part.num_heads * part.head_dim
    per_sequence = 0
    layer_ids = {id(m) for layer in encoder_layers(model) for m in layer.modules()}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in layer_ids:
            per_sequence += 2 * module.in_features * module.out_features
    return total + per_sequence // seq
