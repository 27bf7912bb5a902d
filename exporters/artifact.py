"""The deployable folder (``model.onnx``, every variant, config, tokenizer, ``manifest.json``, model card) and
batched prediction on it.

The folder loads with onnxruntime and the ``tokenizers`` library alone::

    import json, numpy as np, onnxruntime as ort
    from tokenizers import Tokenizer

    manifest = json.load(open("artifact/manifest.json"))
    tokenizer = Tokenizer.from_file("artifact/tokenizer.json")
    tokenizer.enable_truncation(manifest["tokenizer"]["max_length"])
    tokenizer.enable_padding(pad_id=manifest["tokenizer"]["pad_id"], pad_token=manifest["tokenizer"]["pad_token"])
    options = ort.SessionOptions()
    for key, value in manifest.get("cpu_session_config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession("artifact/model.onnx", options)

:func:`load_artifact` does exactly that, and so imports neither torch nor transformers.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporters.onnx import CPU_SESSION_CONFIG, cpu_session_options
from pipeline.files import sha256_file, write_json_atomic

SCHEMA = "dsprune.artifact/1"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
# Files copied from the checkpoint folder when present: the config for optimum/transformers, the tokenizer.
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ArtifactFormatError(ValueError):
    """An artifact folder is incomplete or its manifest does not describe it."""


@dataclass(frozen=True)
class Variant:
    """One ONNX file of the artifact and what was measured about it.

    Attributes:
        source: the file to copy in.
        file: its name in the artifact, e.g. ``model-int8-dynamic.onnx``.
        precision: "fp32", "int8" or "fp16".
        preset: the quantization preset, None for fp32.
        graph: "plain" (as exported) or "fused" (onnxruntime's transformer optimizer).
        device: "cpu" or "gpu", where the variant is meant to run.
        metric: dev-set metrics, e.g. {"accuracy": 0.91}.
        drop: primary-metric drop against the fp32 model (positive = worse).
        fused_ops: {contrib op type: count}.
        latency: the stage's timing of this file (p50_ms, batch, seq, threads), when timed.
    """

    source: Path
    file: str
    precision: str
    preset: str | None
    graph: str
    device: str
    metric: dict[str, float]
    drop: float
    fused_ops: dict[str, int] = field(default_factory=dict)
    latency: dict | None = None


@dataclass(frozen=True)
class TaskInfo:
    """What the model predicts and how its inputs are made.

    Attributes:
        name: task name, e.g. "sst2".
        metric: the primary metric's name.
        label_names: class names in logit order; None for regression.
        text_segments: 1 (single text) or 2 (a pair, given tab-separated to :meth:`ArtifactModel.predict`).
        max_length: tokens per example the model was evaluated with (longer texts are truncated).
        eval_examples: dev examples behind the metrics.
    """

    name: str
    metric: str
    label_names: tuple[str, ...] | None
    text_segments: int
    max_length: int
    eval_examples: int


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


_ONNX_TYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 9: "bool"}


def _signature(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def describe(value):
        kind = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in kind.shape.dim]
        return {"name": value.name, "dtype": _ONNX_TYPES.get(kind.elem_type, str(kind.elem_type)), "shape": shape}

    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in model.graph.output],
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
    }


def _tokenizer_settings(checkpoint: Path, max_length: int) -> dict:
    config = json.loads((checkpoint / "tokenizer_config.json").read_text()) \
        if (checkpoint / "tokenizer_config.json").is_file() else {}
    from tokenizers import Tokenizer

    pad_token = config.get("pad_token") or "[PAD]"
    if isinstance(pad_token, dict):
        pad_token = pad_token.get("content", "[PAD]")
    pad_id = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).token_to_id(pad_token)
    if pad_id is None:
        raise ArtifactFormatError(f"{checkpoint / 'tokenizer.json'}: pad token {pad_token!r} not in the vocabulary")
    return {"file": "tokenizer.json", "max_length": max_length, "pad_token": pad_token, "pad_id": pad_id,
            "pad_type_id": int(config.get("pad_token_type_id", 0))}


def build_artifact(
    out,
    variants: Sequence[Variant],
    *,
    chosen: str,
    checkpoint,
    task: TaskInfo,
    why_chosen: str = "",
    latency: Mapping | None = None,
    made_by: Mapping | None = None,
) -> dict:
    """Write the deployable folder: every variant, ``model.onnx`` (the chosen one), config, tokenizer,
    ``manifest.json`` and ``README.md``.

    Args:
        out: the folder to fill (created; files already there are overwritten).
        variants: the ONNX files and their measurements.
        chosen: the ``file`` of the variant that becomes ``model.onnx``.
        checkpoint: the folder with ``config.json`` and the tokenizer files (``tokenizer.json`` required).
        task: labels, metric and tokenization length.
        why_chosen: one sentence for the manifest and the card.
        latency: a benchmark summary of the chosen variant ({"rows": [...], "machine": {...}}), if any.
        made_by: provenance (versions, run folder, config hash) recorded as given.

    Returns:
        The manifest written.

    Raises:
        ArtifactFormatError: ``chosen`` is not among the variants, or the tokenizer is missing.
    """
    out, checkpoint = Path(out), Path(checkpoint)
    by_file = {v.file: v for v in variants}
    if chosen not in by_file:
        raise ArtifactFormatError(f"chosen variant {chosen!r} not among {sorted(by_file)}")
    if not (checkpoint / "tokenizer.json").is_file():
        raise ArtifactFormatError(f"{checkpoint / 'tokenizer.json'}: missing; the artifact needs a fast tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    for v in variants:
        _link_or_copy(Path(v.source), out / v.file)
    _link_or_copy(out / chosen, out / MODEL_FILE)
    for name in CHECKPOINT_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    for path in out.iterdir():
        _make_readable(path)

    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    variant_rows = []
    for v in variants:
        row = {k: val for k, val in asdict(v).items() if k != "source"}
        row["bytes"] = (out / v.file).stat().st_size
        row.update(_signature(out / v.file))
        variant_rows.append(row)
    signature = _signature(out / MODEL_FILE)
    manifest = {
        "schema": SCHEMA,
        "model": MODEL_FILE,
        "chosen": {"file": chosen, "why": why_chosen},
        **signature,
        "labels": list(task.label_names) if task.label_names is not None else None,
        "task": {"name": task.name, "metric": task.metric, "text_segments": task.text_segments,
                 "eval_examples": task.eval_examples},
        "tokenizer": _tokenizer_settings(checkpoint, task.max_length),
        "cpu_session_config": dict(CPU_SESSION_CONFIG),  # for CPU sessions; the fp16 variants target GPUs
        "architecture": {k: config.get(k) for k in ("model_type", "num_hidden_layers", "num_attention_heads",
                                                      "hidden_size") if k in config},
        "kept_heads": config.get("dsprune_kept_heads"),
        "variants": variant_rows,
        "latency": dict(latency) if latency else None,
        "made_by": dict(made_by or {}),
    }
    (out / CARD_FILE).write_text(model_card(manifest))
    manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    write_json_atomic(out / MANIFEST_FILE, manifest)
    _make_readable(out / MANIFEST_FILE)
    return manifest


def _make_readable(path: Path) -> None:
    # Temp files (mkstemp) are created 0600; a folder meant for deployment is read by other users.
    path.chmod(path.stat().st_mode | 0o444)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def model_card(manifest: Mapping) -> str:
    """A short README.md for the artifact, written from its manifest."""
    task, metric = manifest["task"], manifest["task"]["metric"]
    arch = manifest.get("architecture") or {}
    kept = manifest.get("kept_heads")
    total = (arch.get("num_hidden_layers") or 0) * (arch.get("num_attention_heads") or 0)
    heads = (f"{sum(len(v) for v in kept.values())} of {total} attention heads kept "
             f"({', '.join(f'layer {k}: {len(v)}' for k, v in sorted(kept.items(), key=lambda kv: int(kv[0])))})"
             if kept else "all attention heads kept")
    chosen = manifest["chosen"]["file"]
    lines = [
        f"# {arch.get('model_type', 'transformer')} classifier for {task['name']}, head-pruned by dsprune",
        "",
        f"A {arch.get('model_type', '')} model with {heads}, exported to ONNX. "
        f"`{MODEL_FILE}` is `{chosen}`{': ' + manifest['chosen']['why'] if manifest['chosen']['why'] else ''}.",
        "",
        f"Labels: {', '.join(manifest['labels']) if manifest['labels'] else 'none (regression: one score)'}. "
        f"Inputs: {', '.join(i['name'] for i in manifest['inputs'])} (int64, batch x seq, at most "
        f"{manifest['tokenizer']['max_length']} tokens); output: `logits`.",
        "",
        "## Variants",
        "",
        f"{metric} on {task['eval_examples']} dev examples; drop: against the fp32 variant (positive = worse). "
        "graph: plain as exported, or fused by onnxruntime's transformer optimizer.",
        "",
        "| file | precision | graph | device | " + metric + " | drop | size | p50 (stage timing) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in manifest["variants"]:
        latency = v.get("latency")
        timing = f"{latency['p50_ms']:.1f} ms (batch {latency['batch']}, seq {latency['seq']}, " \
                 f"{latency['threads']} threads)" if latency else "not timed on CPU" if v["device"] == "gpu" else "-"
        lines.append(f"| `{v['file']}` | {v['precision']} | {v['graph']} | {v['device']} | "
                     f"{v['metric'][metric]:.4f} | {v['drop']:+.4f} | {_mb(v['bytes'])} | {timing} |")
    bench = manifest.get("latency")
    if bench and bench.get("rows"):
        machine = bench.get("machine") or {}
        lines += ["", f"## Latency of `{MODEL_FILE}` ({bench.get('variant', chosen)}, benchmark stage)", "",
                  f"{machine.get('cpu', 'CPU')}, load average {(machine.get('load_avg') or [0])[0]:.2f} at the start; "
                  "each configuration in its own process, interleaved.", "",
                  "| batch | seq | threads | p50 ms | p90 ms | throughput/s |", "|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            lines.append(f"| {r['batch']} | {r['seq']} | {r['threads']} | {r['p50_ms']:.2f} | "
                         f"{r.get('p90_ms', float('nan')):.2f} | {r.get('throughput_per_s', float('nan')):.1f} |")
    lines += [
        "", "## Use", "",
        "```python",
        "import json, numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "",
        "manifest = json.load(open('manifest.json'))",
        "tok = Tokenizer.from_file('tokenizer.json')",
        "tok.enable_truncation(manifest['tokenizer']['max_length'])",
        "tok.enable_padding(pad_id=manifest['tokenizer']['pad_id'], pad_token=manifest['tokenizer']['pad_token'])",
        "enc = tok.encode_batch(['a great movie', 'a dull one'])",
        "feeds = {'input_ids': np.array([e.ids for e in enc], dtype=np.int64),",
        "         'attention_mask': np.array([e.attention_mask for e in enc], dtype=np.int64),",
        "         'token_type_ids': np.array([e.type_ids for e in enc], dtype=np.int64)}",
        "options = ort.SessionOptions()",
        "for key, value in manifest.get('cpu_session_config', {}).items():  # the settings dsprune timed with",
        "    options.add_session_config_entry(key, value)",
        "session = ort.InferenceSession('model.onnx', options)",
        "names = [i.name for i in session.get_inputs()]",
        "logits = session.run(['logits'], {k: v for k, v in feeds.items() if k in names})[0]",
        "```",
        "",
        "or `dsprune predict ARTIFACT_DIR \"some text\"`. fp16 variants are meant for GPU execution providers "
        "(inputs stay int64, logits fp32). `manifest.json` lists every file's sha256, the inputs, outputs and opsets.",
        "",
    ]
    made_by = manifest.get("made_by") or {}
    if made_by:
        lines += ["## Provenance", ""] + [f"- {k}: {v}" for k, v in sorted(made_by.items()) if not isinstance(v, dict)]
        lines += [f"- {k}: " + ", ".join(f"{a} {b}" for a, b in sorted(v.items()))
                  for k, v in sorted(made_by.items()) if isinstance(v, dict)] + [""]
    return "\n".join(lines)


def read_manifest(folder) -> dict:
    """The artifact's manifest.

    Raises:
        ArtifactFormatError: the folder has no readable manifest of this schema.
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactFormatError(f"{path}: missing; is {folder} a dsprune artifact folder?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactFormatError(f"{path}: unreadable ({err.__class__.__name__})") from None
    if manifest.get("schema") != SCHEMA:
        raise ArtifactFormatError(f"{path}: schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    return manifest


def verify_artifact(folder) -> None:
    """Check every file listed in the manifest against its sha256.

    Raises:
        ArtifactFormatError: naming the first missing or changed file.
    """
    folder = Path(folder)
    for name, entry in read_manifest(folder)["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactFormatError(f"{path}: missing")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactFormatError(f"{path}: sha256 differs from manifest.json")


class ArtifactModel:
    """An artifact loaded for inference: onnxruntime session, tokenizer and labels.

    Args:
        folder: the artifact folder.
        file: an ONNX file of the folder; ``model.onnx`` by default.
        threads: onnxruntime intra-op threads; None lets onnxruntime choose.
    """

    def __init__(self, folder, file: str = MODEL_FILE, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        path = self.folder / file
        if not path.is_file():
            raise ArtifactFormatError(f"{path}: missing; files: {', '.join(sorted(self.manifest['files']))}")
        settings = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer.from_file(str(self.folder / settings["file"]))
        self.tokenizer.enable_truncation(settings["max_length"])
        self.tokenizer.enable_padding(pad_id=settings["pad_id"], pad_token=settings["pad_token"],
                                      pad_type_id=settings.get("pad_type_id", 0))
        options = cpu_session_options(threads, self.manifest.get("cpu_session_config", {}))
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.labels = self.manifest["labels"]

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and segment ids (int64, batch x longest) of texts; a pair task
        takes each text as ``first<TAB>second``."""
        if self.manifest["task"]["text_segments"] == 2:
            pairs = [tuple(t.split("\t", 1)) if "\t" in t else (t, "") for t in texts]
            encodings = self.tokenizer.encode_batch(pairs)
        else:
            encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """float32 logits of shape (len(texts), outputs), in one batch."""
        feeds = self.encode(texts)
        return self.session.run(["logits"], {n: feeds[n] for n in self.input_names})[0].astype(np.float32)

    def predict(self, texts: Iterable[str], batch_size: int = 32) -> list[dict]:
        """One dict per text: ``text``, ``label`` (None for regression), ``score`` (the label's
        probability, or the regression value) and ``scores`` ({label: probability})."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        texts = list(texts)
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            logits = self.logits(chunk)
            if self.labels is None:
                results += [{"text": t, "label": None, "score": float(row[0]), "scores": {}}
                            for t, row in zip(chunk, logits)]
                continue
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
            for t, p in zip(chunk, probabilities):
                best = int(p.argmax())
                results.append({"text": t, "label": self.labels[best], "score": float(p[best]),
                                "scores": {name: float(x) for name, x in zip(self.labels, p)}})
        return results


def load_artifact(folder, *, file: str = MODEL_FILE, threads: int | None = None) -> ArtifactModel:
    """Load an artifact folder for :meth:`ArtifactModel.predict` (onnxruntime and tokenizers only)."""
    return ArtifactModel(folder, file=file, threads=threads)


def format_table(predictions: Sequence[Mapping], width: int = 60) -> str:
    """Predictions as an aligned text table: label, score, text (cut to ``width`` characters)."""
    rows = [(str(p["label"]) if p["label"] is not None else "-", f"{p['score']:.4f}",
             p["text"] if len(p["text"]) <= width else p["text"][:width - 3] + "...") for p in predictions]
    label_width = max([5, *(len(r[0]) for r in rows)])
    lines = [f"{'label':<{label_width}}  {'score':>7}  text"]
    lines += [f"{label:<{label_width}}  {score:>7}  {text}" for label, score, text in rows]
    return "\n".join(lines)
