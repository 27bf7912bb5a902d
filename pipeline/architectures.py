"""Where each model family keeps its attention heads.

One small adapter per family, in one table. Gating, surgery, FLOP counting and export ask the
adapter for the q/k/v/o projections of every layer instead of hard-coding module names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's `model_type` has no adapter."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one model family, relative to the objects named in each field.

    Attributes:
        layers: dotted path from the base model (``model.base_model``) to the list of layers.
        attention: path from a layer to the attention block that surgery may replace whole.
        query, key, value, output: paths from the attention block to its projections.
        heads_module: path from the attention block to the module that holds the head count.
        head_count_attr: attribute on ``heads_module`` holding the number of heads.
        all_head_size_attr: attribute holding heads * head_dim, or "" when the family has none.
        layer_norm: path from the attention block to the post-attention LayerNorm (headless layers keep it).
    """

    layers: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    heads_module: str
    head_count_attr: str
    all_head_size_attr: str
    layer_norm: str


_BERT_LIKE = ArchitectureAdapter(
    layers="encoder.layer",
    attention="attention",
    query="self.query",
    key="self.key",
    value="self.value",
    output="output.dense",
    heads_module="self",
    head_count_attr="num_attention_heads",
    all_head_size_attr="all_head_size",
    layer_norm="output.LayerNorm",
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
}


def adapter_for(model_or_config) -> ArchitectureAdapter:
    """The adapter for a model or config, by ``config.model_type``.

    Raises:
        UnsupportedModelError: naming the type and listing the supported ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


@dataclass
class AttentionParts:
    """The attention block of one layer, resolved to modules."""

    layer: int
    block: nn.Module
    query: nn.Linear | None
    key: nn.Linear | None
    value: nn.Linear | None
    output: nn.Linear | None
    head_dim: int
    num_heads: int


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_path(model.base_model, adapter_for(model).layers)


def head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def attention_parts(model: nn.Module) -> list[AttentionParts]:
    """q/k/v/o modules and head counts of every layer; a headless layer has ``num_heads == 0``."""
    adapter = adapter_for(model)
    dim = head_dim(model.config)
    parts = []
    for i, layer in enumerate(encoder_layers(model)):
        block = get_path(layer, adapter.attention)
        if isinstance(block, HeadlessAttention):
            parts.append(AttentionParts(i, block, None, None, None, None, dim, 0))
            continue
        query = get_path(block, adapter.query)
        parts.append(
            AttentionParts(
                layer=i,
                block=block,
                query=query,
                key=get_path(block, adapter.key),
                value=get_path(block, adapter.value),
                output=get_path(block, adapter.output),
                head_dim=dim,
                num_heads=query.out_features // dim,
            )
        )
    return parts


class HeadlessAttention(nn.Module):
    """The attention block of a layer whose heads were all removed.

    With no heads the output projection sees zeros, so the block reduces to
    ``LayerNorm(hidden + output_bias)``. Keeping this explicit avoids zero-width tensors,
    which exported ONNX graphs reject.
    """

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.LayerNorm(hidden_states + self.bias), None
