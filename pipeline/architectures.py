"""Where each model family keeps its attention heads.

One small adapter per family, in one table. Gating, surgery, FLOP counting and export ask the
adapter for the q/k/v/o projections of every layer instead of hard-coding module names.

The families differ in three ways that surgery must respect (read from transformers 5's modeling code):

- Where the residual and LayerNorm sit. BERT, RoBERTa, XLM-R, ELECTRA and MPNet apply
  ``LayerNorm(attention + hidden)`` inside the attention block; DistilBERT applies ``sa_layer_norm``
  in the layer, after the block; ViT is pre-LN (``layernorm_before`` runs before the block, the
  layer adds the residual). A headless block therefore returns ``LayerNorm(hidden + output_bias)``
  in the first group and only the output bias in the other two (``layer_norm == ""``).
- Where the head count lives. Every family here infers the head count from tensor shapes in its
  ``view`` calls (``-1``), but MPNet reshapes its context with ``all_head_size``; surgery updates
  both attributes wherever the family has them.
- Per-head inputs computed outside the layer. MPNet's encoder computes one relative position bias
  of shape (batch, heads, q, k) for all layers from a single shared ``relative_attention_bias``
  table; a pruned MPNet layer selects its kept heads' columns of that bias (see
  :func:`select_position_bias_heads_`), so the shared table stays whole.
"""
from __future__ import annotations

import inspect
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
        heads_module: path from the attention block to the module that holds the head count
            ("" for the block itself).
        head_count_attr: attribute on ``heads_module`` holding the number of heads.
        all_head_size_attr: attribute holding heads * head_dim, or "" when the family has none.
        layer_norm: path from the attention block to the LayerNorm that the block itself applies
            after the residual (headless blocks keep it); "" when the layer applies the residual
            (and any LayerNorm) outside the block, so a headless block returns the output bias alone.
        position_bias_arg: name of a ``heads_module.forward`` argument that carries a per-head bias of
            shape (batch, original heads, q, k) computed outside the layer; "" when there is none.
        ffn_in, ffn_out: paths from a layer to the feed-forward block's two linears (hidden ->
            intermediate, activation, intermediate -> hidden).
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
    position_bias_arg: str = ""
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"


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
    # TransformerBlock: sa_layer_norm(attention(x) + x) in the layer, so no LayerNorm in the block.
    "distilbert": ArchitectureAdapter(
        layers="transformer.layer",
        attention="attention",
        query="q_lin",
        key="k_lin",
        value="v_lin",
        output="out_lin",
        heads_module="",
        head_count_attr="n_heads",
        all_head_size_attr="",
        layer_norm="",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
    ),
    # MPNetAttention: LayerNorm(attn(x).o + x); the encoder passes one position bias to every layer.
    "mpnet": ArchitectureAdapter(
        layers="encoder.layer",
        attention="attention",
        query="attn.q",
        key="attn.k",
        value="attn.v",
        output="attn.o",
        heads_module="attn",
        head_count_attr="num_attention_heads",
        all_head_size_attr="all_head_size",
        layer_norm="LayerNorm",
        position_bias_arg="position_bias",
    ),
    # Pre-LN ViTLayer: x + attention(layernorm_before(x)); transformers 5 names the projections
    # q_proj/k_proj/v_proj/o_proj directly on ViTAttention (older checkpoints are renamed on load).
    "vit": ArchitectureAdapter(
        layers="layers",
        attention="attention",
        query="q_proj",
        key="k_proj",
        value="v_proj",
        output="o_proj",
        heads_module="",
        head_count_attr="num_attention_heads",
        all_head_size_attr="",
        layer_norm="",
        ffn_in="mlp.fc1",
        ffn_out="mlp.fc2",
    ),
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
    """The object at dotted ``path`` below ``root``; "" is ``root`` itself."""
    obj = root
    for part in path.split(".") if path else ():
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
    # ViT's attention reads an optional config.head_dim; the other families derive it.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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


@dataclass
class FeedForwardParts:
    """The feed-forward block of one layer: ``output(act(input(x)))``; ``width`` intermediate neurons."""

    layer: int
    input: nn.Linear
    output: nn.Linear
    width: int


def feed_forward_parts(model: nn.Module) -> list[FeedForwardParts]:
    """The two feed-forward linears of every layer; an emptied block has ``width == 0``.

    An emptied block keeps one dead neuron (zero weights in and out, see
    :func:`pipeline.surgery.prune_ffn_`), so its width is read from the kept neurons that surgery
    recorded in the config, not from the module shape.
    """
    adapter = adapter_for(model)
    kept = getattr(model.config, "dsprune_kept_ffn", None) or {}
    parts = []
    for i, layer in enumerate(encoder_layers(model)):
        inp, out = get_path(layer, adapter.ffn_in), get_path(layer, adapter.ffn_out)
        width = len(kept[str(i)]) if str(i) in kept else inp.out_features
        parts.append(FeedForwardParts(i, inp, out, width))
    return parts


class HeadlessAttention(nn.Module):
    """The attention block of a layer whose heads were all removed.

    With no heads the output projection sees zeros and returns its bias. For families whose block
    applies the residual and LayerNorm itself (BERT-like, MPNet) the block reduces to
    ``LayerNorm(hidden + output_bias)``; for those whose layer does it (DistilBERT, ViT; pass
    ``layer_norm=None``) it returns the bias broadcast to the input's shape and the layer adds the
    residual. Either way it returns ``(output, None)``, the (output, attention weights) pair every
    supported layer unpacks. Keeping this explicit avoids zero-width tensors, which exported ONNX
    graphs reject.
    """

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm | None = None):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.LayerNorm is None:
            return self.bias.expand_as(hidden_states), None
        return self.LayerNorm(hidden_states + self.bias), None


# Name of the non-persistent buffer on a pruned attention module that lists its kept heads in
# original numbering, for families whose per-head position bias comes from outside the layer.
POSITION_BIAS_HEADS = "dsprune_position_bias_heads"


def _select_kept_bias_heads(module: nn.Module, args: tuple, kwargs: dict):
    name, position = module._dsprune_position_bias_arg
    index = getattr(module, POSITION_BIAS_HEADS)
    if name in kwargs:
        if kwargs[name] is not None:
            kwargs = {**kwargs, name: kwargs[name].index_select(1, index)}
    elif len(args) > position and args[position] is not None:
        args = (*args[:position], args[position].index_select(1, index), *args[position + 1:])
    return args, kwargs


def select_position_bias_heads_(module: nn.Module, argument: str, kept_heads: list[int]) -> None:
    """Make ``module`` use only the ``kept_heads`` columns of the per-head bias passed as ``argument``.

    MPNet's encoder computes one relative position bias for all original heads and hands it to every
    layer. Indexing it per layer keeps the shared ``relative_attention_bias`` table (and so the
    state dict) unchanged, which makes reload exact and exports as a constant-index Gather. The kept
    heads live in a non-persistent buffer (absent from the state dict; ``load_pruned`` rebuilds it
    from config.json), and the pre-hook is a module-level function so deep copies keep working.
    """
    index = torch.tensor(kept_heads, dtype=torch.long, device=next(module.parameters()).device)
    if hasattr(module, POSITION_BIAS_HEADS):
        setattr(module, POSITION_BIAS_HEADS, index)
        return
    names = [p for p in inspect.signature(module.forward).parameters]
    if argument not in names:
        raise ValueError(f"{type(module).__name__}.forward has no argument {argument!r}")
    module._dsprune_position_bias_arg = (argument, names.index(argument))
    module.register_buffer(POSITION_BIAS_HEADS, index, persistent=False)
    module.register_forward_pre_hook(_select_kept_bias_heads, with_kwargs=True)
