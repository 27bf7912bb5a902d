"""The accuracy study: task metric against K for every head-selection method (the paper's comparison).

    python -m benchmarks.study -c configs/study-sst2-minilm.yaml [--set key=value ...] [--workers N]
        [--only method=dsp,k=36,seed=0] [--shard i/n] [--out DIR] [--resume]
    python -m benchmarks.study merge DIR_OR_JSONL ... [--results benchmarks/results]

A grid row is one (variant, K, seed). A variant is ``method:mode`` for the trained methods
(``dsp:joint``, ``dsp:pipelined``, ``ste:...``, ``hardconcrete:...``) and the bare method for
``michel``, ``michel-iterative`` and ``random``, which read the fine-tuned reference. Joint variants
start from the pretrained model and train gates and weights together; pipelined ones learn only the
gates on the frozen reference (then optionally recover with fine-tuning under the hard mask). The
unpruned reference is fine-tuned once per seed and saved under ``OUT/reference-seed{s}``.

Each finished row is appended at once to ``OUT/rows-*.jsonl``, so a killed run keeps its rows and
``--resume`` skips them. With ``--workers N`` the command starts N worker processes on the one
device, each pinned to its own CPU cores, which claim rows from the grid; the step-time comparison
(plain fine-tuning vs gated steps) runs first, alone, so other workers do not disturb it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataConfig, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
TRAINED = ("dsp", "ste", "hardconcrete")
UNTRAINED = ("michel", "michel-iterative", "random")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ReferenceSpec:
    """Plain fine-tuning of the unpruned reference (AdamW, linear warm-up then decay)."""

    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1


@dataclass(frozen=True)
class JointSpec:
    """Joint variants: gates and weights together, weights' lr decaying linearly, from the pretrained
    model (``init: pretrained``, the paper's joint DSP) or from the seed's fine-tuned reference
    (``init: finetuned``, as ``dsprune run`` does by default; the reference is trained first)."""

    epochs: float = 3.0
    lr: float = 5e-5
    init: str = "pretrained"


@dataclass(frozen=True)
class PipelinedSpec:
    """Pipelined variants: gates only on the frozen reference; then optional recovery fine-tuning."""

    epochs: float = 1.0
    recovery_epochs: float = 0.0
    recovery_lr: float = 2e-5


@dataclass(frozen=True)
class DspSpec:
    gate_lr: float = 0.5
    temperature_start: float = 1000.0
    temperature_end: float = 1e-8
    cooldown_fraction: float = 0.5  # of the gate-training steps


@dataclass(frozen=True)
class SteSpec:
    gate_lr: float = 0.5


@dataclass(frozen=True)
class HardConcreteSpec:
    gate_lr: float = 0.1  # the reference code's pruning_lr for Voita et al.
    penalty: float = 0.5  # lambda on the expected L0 norm, the reference code's default
    temperature: float = 0.33
    penalty_warmup_fraction: float = 0.0  # of the gate-training steps, the penalty growing from 0


@dataclass(frozen=True)
class DistillSpec:
    """``+kd`` variants: the seed's fine-tuned reference teaches while the gates train
    (pipeline.training.add_distillation_)."""

    weight: float = 0.5
    temperature: float = 2.0


@dataclass(frozen=True)
class MichelSpec:
    batches: int = 200  # training batches per importance estimate
    step_fraction: float = 0.1  # michel-iterative: share of all heads removed per round


@dataclass(frozen=True)
class TimingSpec:
    """Training-step time of plain fine-tuning vs gated steps, interleaved, on the pretrained model."""

    steps: int = 50
    warmup: int = 10
    rounds: int = 3  # passes of warmup + steps cycles, every configuration one step per cycle
    methods: tuple[str, ...] = ("dsp", "ste", "hardconcrete")
    placements: tuple[str, ...] = ("auto",)  # where gates live (pipeline.gates.GATES_ON): auto, model, cpu
    profile: bool = False  # also record the top operators of plain and every method's steps (torch.profiler)
    # Also time plain steps with a host sync where gates on the CPU force one: mid-backward (the mask
    # gradient's copy to the host) and after backward (clipping reads the total norm on the host).
    sync_probes: bool = False
    # Also time plain steps with the mask hooks installed and a fixed all-ones mask: the cost of
    # applying a mask, apart from the gates' parameters (their mask, its gradient, optimizer and clipping).
    hooks_probe: bool = False
    # Also time plain steps through the mask hooks with the all-ones mask already on the model's device in
    # its dtype (plain+hooks@device: no conversion and copy per step), and each method's steps with its
    # gates left out of clipping and the optimizer (<method>+unstepped: mask and gradient, no update).
    gate_probes: bool = False


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    out_dir: str = "runs/study"
    seeds: tuple[int, ...] = (0, 1, 2)
    keeps: tuple[int, ...] = (72, 54, 36, 24, 12, 6)
    variants: tuple[str, ...] = ("dsp:joint", "dsp:pipelined", "ste:joint", "ste:pipelined", "hardconcrete:joint",
                                 "hardconcrete:pipelined", "michel", "michel-iterative", "random")
    per_layer: bool = False
    threads: int = 2  # CPU threads per worker process
    eval_batch_size: int = 128
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    joint: JointSpec = field(default_factory=JointSpec)
    pipelined: PipelinedSpec = field(default_factory=PipelinedSpec)
    dsp: DspSpec = field(default_factory=DspSpec)
    ste: SteSpec = field(default_factory=SteSpec)
    hardconcrete: HardConcreteSpec = field(default_factory=HardConcreteSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    michel: MichelSpec = field(default_factory=MichelSpec)
    timing: TimingSpec = field(default_factory=TimingSpec)
    # Variants with "+ffn" select heads and feed-forward blocks under one FLOP budget: at each K of
    # ``keeps`` the FLOPs of K heads alone (a heads-only row at the same cost), and at each of these
    # shares of the model's FLOPs per token at ``flops_seq`` tokens.
    flops_fractions: tuple[float, ...] = ()
    ffn_block_size: int = 64
    flops_seq: int = 128

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FFN_SUFFIX = "+ffn"
FFN_VARIANT_METHODS = ("dsp", "ste", "random")
KD_SUFFIX = "+kd"


def _modifiers(variant: str) -> tuple[str, set[str]]:
    """``"dsp+ffn+kd:joint"`` -> ("dsp", {"+ffn", "+kd"})."""
    method = variant.partition(":")[0]
    found = set()
    for suffix in (KD_SUFFIX, FFN_SUFFIX):  # written in the order method+ffn+kd
        if method.endswith(suffix):
            method, found = method[: -len(suffix)], found | {suffix}
    return method, found


def variant_prunes_ffn(variant: str) -> bool:
    return FFN_SUFFIX in _modifiers(variant)[1]


def variant_distills(variant: str) -> bool:
    return KD_SUFFIX in _modifiers(variant)[1]


def parse_variant(variant: str) -> tuple[str, str]:
    """``"dsp:joint"`` -> ("dsp", "joint"); ``"michel"`` -> ("michel", "reference");
    ``"dsp+ffn:joint"`` -> ("dsp", "joint") (heads and feed-forward blocks, see :func:`variant_prunes_ffn`);
    ``"dsp+kd:joint"`` -> ("dsp", "joint") (the reference teaches, see :func:`variant_distills`)."""
    method, modifiers = _modifiers(variant)
    mode = variant.partition(":")[2]
    if FFN_SUFFIX in modifiers and method not in FFN_VARIANT_METHODS:
        raise ValueError(f"variant {variant!r}: feed-forward blocks are selected by "
                         f"{', '.join(m + FFN_SUFFIX for m in FFN_VARIANT_METHODS)}")
    if KD_SUFFIX in modifiers and method not in TRAINED:
        raise ValueError(f"variant {variant!r}: {KD_SUFFIX} distils while gates train: "
                         f"{', '.join(m + KD_SUFFIX for m in TRAINED)}")
    if method in TRAINED:
        if mode not in ("joint", "pipelined"):
            raise ValueError(f"variant {variant!r}: a trained method needs :joint or :pipelined")
        return method, mode
    if method in UNTRAINED and not mode:
        return method, "reference"
    raise ValueError(f"variant {variant!r}: expected one of {', '.join(m + ':joint|pipelined' for m in TRAINED)}, "
                     f"{', '.join(UNTRAINED)}")


def study_config_from_dict(data: dict, where: str = "config") -> StudyConfig:
    """Build and validate a StudyConfig; every problem is reported in one ConfigError line."""
    from pipeline.config import ConfigError, _build

    errors: list[str] = []
    config = _build(StudyConfig, data, "", errors)
    for variant in config.variants:
        try:
            parse_variant(variant)
        except ValueError as err:
            errors.append(f"variants: {err}")
    if config.joint.init not in ("pretrained", "finetuned"):
        errors.append(f"joint.init: must be pretrained or finetuned, got {config.joint.init!r}")
    if any(not 0 < f < 1 for f in config.flops_fractions):
        errors.append(f"flops_fractions: each must be in (0, 1), got {list(config.flops_fractions)}")
    if not config.seeds or not config.keeps or not config.variants:
        errors.append("seeds, keeps and variants must not be empty")
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(errors))
    return config


def load_study_config(path, overrides=()) -> StudyConfig:
    from pipeline.config import read_yaml_with_overrides

    return study_config_from_dict(read_yaml_with_overrides(path, overrides), str(path))


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Job:
    kind: str  # "step_time", "reference" or "row"
    seed: int
    variant: str = ""
    keep: int = 0  # heads kept; for "+ffn" variants, the FLOPs of that many heads
    fraction: float | None = None  # "+ffn" variants: a share of the FLOPs instead of keep

    @property
    def key(self) -> str:
        if self.kind == "row" and self.fraction is not None:
            return f"{self.variant}|f={self.fraction:g}|seed={self.seed}"
        if self.kind == "row":
            return f"{self.variant}|k={self.keep}|seed={self.seed}"
        return f"{self.kind}|seed={self.seed}"


def parse_only(text: str | None) -> dict[str, set[str]]:
    """``"method=dsp,k=36,seed=0"`` -> {"method": {"dsp"}, ...}; a key may repeat (method=dsp,method=ste)."""
    filters: dict[str, set[str]] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("method", "mode", "variant", "k", "f", "seed"):
            raise ValueError(f"--only {text!r}: expected method=, mode=, variant=, k=, f= or seed= items")
        filters.setdefault(key, set()).add(value)
    return filters


def grid(config: StudyConfig, only: dict[str, set[str]] | None = None, shard: tuple[int, int] = (0, 1)) -> list[Job]:
    """Every row job in a fixed order, filtered by ``only`` and kept where ``index % n == i``."""
    only = only or {}
    jobs = []
    for seed in config.seeds:
        budgets = [(keep, None) for keep in config.keeps] + [(0, f) for f in config.flops_fractions]
        for keep, fraction in budgets:
            for variant in config.variants:
                if fraction is not None and not variant_prunes_ffn(variant):
                    continue
                method, mode = parse_variant(variant)
                fields = {"method": method, "mode": mode, "variant": variant, "k": str(keep), "seed": str(seed),
                          "f": f"{fraction:g}" if fraction is not None else ""}
                if all(fields[key] in values for key, values in only.items()):
                    jobs.append(Job("row", seed, variant, keep, fraction))
    index, count = shard
    return [job for i, job in enumerate(jobs) if i % count == index]


def read_rows(paths) -> list[dict]:
    """Rows from JSONL files, folders of them (``rows*.jsonl``) and merged results (``.json``, as
    :func:`merge` writes them: its grid rows, references and timing rows); a torn last line is skipped."""
    rows = []
    for path in map(Path, paths):
        if path.suffix == ".json":
            merged = json.loads(path.read_text())
            rows += merged["rows"] + merged["references"] + merged["step_time"]
            continue
        files = sorted(path.glob("rows*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for line in file.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _append_row(path: Path, row: dict) -> None:
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _claim(out: Path, job: Job) -> bool:
    claims = out / "claims"
    claims.mkdir(exist_ok=True)
    name = job.key.replace("|", "_").replace(":", "-").replace("=", "")
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


# --------------------------------------------------------------------------- one process's work


class Context:
    """What every job of one process shares: device, tokenized data, and the config."""

    def __init__(self, config: StudyConfig, out: Path):
        import torch

        from pipeline import data
        from pipeline.models import load_tokenizer

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one weights-loading bar per row drowns the log
        self.config, self.out = config, out
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(config.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        self.tokenizer = load_tokenizer(config.model)
        d = config.data
        self.task = data.task_from_config(d.task, d.text_columns or None, d.label_column or None,
                                          d.label_names or None)
        train = data.read_task(Path(d.train), self.task, d.max_train_examples)
        dev = data.read_task(Path(d.dev), self.task, d.max_eval_examples)
        self.train = data.encode(self.tokenizer, train, d.max_seq_length)
        self.dev = data.encode(self.tokenizer, dev, d.max_seq_length)
        self.row_file = out / f"rows-{os.getpid()}.jsonl"

    def train_batches(self, seed: int):
        from pipeline import data

        return lambda epoch: data.batches(self.train, self.config.reference.batch_size, shuffle=True,
                                          seed=seed * 1000 + epoch)

    def steps(self, epochs: float) -> int:
        from pipeline.training import steps_for

        return steps_for(epochs, len(self.train), self.config.reference.batch_size)

    def pretrained(self, seed: int):
        import torch

        from pipeline.models import load_classifier

        torch.manual_seed(seed)  # the new classifier head
        model = load_classifier(self.config.model, self.task.num_labels, self.task.label_names)
        return model.float().to(self.device)

    def reference_dir(self, seed: int) -> Path:
        return self.out / f"reference-seed{seed}"

    def reference(self, seed: int):
        import dataclasses as dc

        from pipeline.models import load_classifier

        path = self.reference_dir(seed)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: the reference for seed {seed} is not trained yet")
        model_config = dc.replace(self.config.model, name=str(path))
        return load_classifier(model_config, self.task.num_labels, self.task.label_names).float().to(self.device)

    def evaluate(self, model, mask=None, ffn_mask=None) -> float:
        from pipeline import data
        from pipeline.evaluation import score
        from pipeline.gates import add_fixed_mask_
        from pipeline.training import predict

        handles = add_fixed_mask_(model, mask, ffn_mask) if mask is not None else []
        try:
            logits = predict(model, data.batches(self.dev, self.config.eval_batch_size, shuffle=False))
        finally:
            for handle in handles:
                handle.remove()
        return score(self.task, logits, self.dev.labels)[self.task.primary_metric]

    def base_row(self, job: Job) -> dict:
        return {"schema": SCHEMA_VERSION, "study": self.config.name, "kind": job.kind, "key": job.key,
                "seed": job.seed, "task": self.task.name, "metric": self.task.primary_metric,
                "device": self.device.type, "gpu": _gpu_name(), "pid": os.getpid()}


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _weight_groups(model, lr: float, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("head_gates.")]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0}]


def _warmup_decay(total: int, warmup: int):
    return lambda step: (step + 1) / max(1, warmup) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def train_reference(ctx: Context, seed: int) -> dict:
    import torch

    from pipeline.surgery import save_pruned
    from pipeline.training import linear_warmup_decay, train

    ref = ctx.config.reference
    model = ctx.pretrained(seed)
    steps = ctx.steps(ref.epochs)
    optimizer = torch.optim.AdamW(_weight_groups(model, ref.lr, ref.weight_decay))
    scheduler = linear_warmup_decay(optimizer, steps, int(ref.warmup_ratio * steps))
    result = train(model, ctx.train_batches(seed), steps=steps, optimizer=optimizer, scheduler=scheduler,
                   progress=False, description=f"reference seed {seed}")
    value = ctx.evaluate(model)
    save_pruned(model.cpu(), ctx.reference_dir(seed), ctx.tokenizer)
    return {"value": value, "train_steps": result.steps, "train_seconds": round(result.seconds, 2),
            "final_loss": result.final_loss}


def _gate_options(ctx: Context, method: str, steps: int) -> tuple[float, dict]:
    cfg = ctx.config
    if method == "dsp":
        return cfg.dsp.gate_lr, {"temperature_start": cfg.dsp.temperature_start,
                                 "temperature_end": cfg.dsp.temperature_end,
                                 "cooldown_steps": max(1, int(cfg.dsp.cooldown_fraction * steps))}
    if method == "ste":
        return cfg.ste.gate_lr, {}
    hc = cfg.hardconcrete
    return hc.gate_lr, {"penalty": hc.penalty, "temperature": hc.temperature,
                        "penalty_warmup_steps": int(hc.penalty_warmup_fraction * steps)}


def gate_trainer(ctx: Context, method: str, mode: str, seed: int, steps: int, gate_lr: float, record: dict):
    """``train_gates(model, gates)`` for select_heads: joint (weights learn too) or pipelined (frozen)."""
    import torch

    from pipeline.training import train

    def train_gates(model, gates):
        groups = [{"params": list(gates.parameters()), "lr": gate_lr, "weight_decay": 0.0}]
        factors = [lambda step: 1.0]  # the gates keep their learning rate, as in the paper's code
        weights = [p for n, p in model.named_parameters() if not n.startswith("head_gates.")]
        if mode == "joint":
            joint, ref = ctx.config.joint, ctx.config.reference
            for group in _weight_groups(model, joint.lr, ref.weight_decay):
                groups.append(group)
                factors.append(_warmup_decay(steps, int(ref.warmup_ratio * steps)))
        else:
            for p in weights:
                p.requires_grad_(False)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

        def on_step(step):
            gates.step = step

        result = train(model, ctx.train_batches(seed + 500), steps=steps, optimizer=optimizer, scheduler=scheduler,
                       on_step=on_step, progress=False, description=f"{method}:{mode}")
        for p in weights:
            p.requires_grad_(True)
        record.update(train_steps=result.steps, train_seconds=round(result.seconds, 2), final_loss=result.final_loss,
                      seconds_per_step=result.seconds / max(1, result.steps))

    return train_gates


def recover(ctx: Context, model, mask, seed: int) -> dict:
    """Fine-tune the weights under the fixed hard mask (pipelined variants' optional recovery)."""
    import torch

    from pipeline.gates import add_fixed_mask_
    from pipeline.training import linear_warmup_decay, train

    spec = ctx.config.pipelined
    steps = ctx.steps(spec.recovery_epochs)
    handles = add_fixed_mask_(model, mask)
    optimizer = torch.optim.AdamW(_weight_groups(model, spec.recovery_lr, ctx.config.reference.weight_decay))
    scheduler = linear_warmup_decay(optimizer, steps, int(ctx.config.reference.warmup_ratio * steps))
    try:
        result = train(model, ctx.train_batches(seed + 700), steps=steps, optimizer=optimizer, scheduler=scheduler,
                       progress=False, description="recovery")
    finally:
        for handle in handles:
            handle.remove()
    return {"recovery_steps": result.steps, "recovery_seconds": round(result.seconds, 2)}


def run_row(ctx: Context, job: Job) -> dict:
    """Select exactly K heads with the job's variant and score the hard-masked model on dev."""
    import torch

    from pipeline.methods import select_heads

    cfg = ctx.config
    method, mode = parse_variant(job.variant)
    start = time.perf_counter()
    record: dict = {"train_steps": 0, "train_seconds": 0.0}
    from_pretrained = mode == "joint" and cfg.joint.init == "pretrained"
    model = ctx.pretrained(job.seed) if from_pretrained else ctx.reference(job.seed)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    hook = None
    if variant_distills(job.variant):  # before the gates: their penalty is added after the mix
        from pipeline.training import add_distillation_

        hook = add_distillation_(model, ctx.reference(job.seed), weight=cfg.distill.weight,
                                 temperature=cfg.distill.temperature)
    torch.manual_seed(job.seed + 1)
    ffn = _ffn_budget(ctx, model, job) if variant_prunes_ffn(job.variant) else None
    if ffn is not None:
        train_gates = None
        if method in TRAINED:
            steps = ctx.steps(cfg.joint.epochs if mode == "joint" else cfg.pipelined.epochs)
            gate_lr, options = _gate_options(ctx, method, steps)
            train_gates = gate_trainer(ctx, method, mode, job.seed, steps, gate_lr, record)
        else:
            options = {}
        selection = select_heads(method, model, layers * heads, seed=job.seed, train_gates=train_gates, ffn=ffn,
                                 **options)
    elif method in TRAINED and not (mode == "pipelined" and job.keep == layers * heads):
        steps = ctx.steps(cfg.joint.epochs if mode == "joint" else cfg.pipelined.epochs)
        gate_lr, options = _gate_options(ctx, method, steps)
        selection = select_heads(method, model, job.keep, per_layer=cfg.per_layer, seed=job.seed,
                                 train_gates=gate_trainer(ctx, method, mode, job.seed, steps, gate_lr, record),
                                 **options)
    elif method in TRAINED:  # every head kept and the weights frozen: the reference itself
        selection = select_heads("random", model, job.keep, per_layer=cfg.per_layer, seed=job.seed)
    else:
        from pipeline import data

        def batches_fn(round_):
            epoch = data.batches(ctx.train, cfg.reference.batch_size, shuffle=True, seed=job.seed * 1000 + 900 + round_)
            return (batch for _, batch in zip(range(cfg.michel.batches), epoch))

        selection = select_heads(method, model, job.keep, per_layer=cfg.per_layer, seed=job.seed,
                                 batches_fn=batches_fn, step_fraction=cfg.michel.step_fraction)
    if hook is not None:
        hook.remove()
    if mode == "pipelined" and cfg.pipelined.recovery_epochs > 0:
        record.update(recover(ctx, model, selection.mask, job.seed))
    value = ctx.evaluate(model, selection.mask, selection.ffn_mask)
    mask = selection.mask
    row = ctx.base_row(job)
    row.update(variant=job.variant, method=method, mode=mode, keep=job.keep, per_layer=cfg.per_layer,
               init="pretrained" if from_pretrained else "finetuned",
               value=value, heads_per_layer=mask.sum(1).tolist(),
               kept_heads={str(i): torch.nonzero(r).flatten().tolist() for i, r in enumerate(mask)},
               flops_kept_fraction=_flops_kept(ctx, model, selection), wall_seconds=round(time.perf_counter() - start, 2),
               **record)
    if ffn is not None:
        row.update(fraction=job.fraction, flops_budget=ffn.flops_keep_fraction, heads_kept=int(mask.sum()),
                   ffn_blocks_per_layer=selection.ffn_mask.sum(1).tolist(), ffn_block_size=ffn.block_size)
    row.update({k: v for k, v in selection.info.items() if k in ("penalty_keeps", "final_temperature")})
    return row


def _ffn_budget(ctx: Context, model, job: Job):
    """The job's one FLOP budget: its fraction, or what keeping ``job.keep`` heads alone would cost."""
    from pipeline.methods import FfnBudget
    from pipeline.surgery import flops_per_token, unit_flops

    cfg = ctx.config
    fraction = job.fraction
    if fraction is None:
        heads, _ = unit_flops(model, cfg.ffn_block_size, cfg.flops_seq)
        removed = float(heads.flatten().sort().values[: heads.numel() - job.keep].sum())  # all heads cost the same
        fraction = 1 - removed / flops_per_token(model, cfg.flops_seq)
    return FfnBudget(cfg.ffn_block_size, flops_keep_fraction=fraction, seq=cfg.flops_seq)


def _flops_kept(ctx: Context, model, selection) -> float:
    """FLOPs per token at ``flops_seq`` of the selected heads (and blocks) over the unpruned model's."""
    from pipeline.surgery import flops_per_token, unit_flops

    cfg = ctx.config
    heads, blocks = unit_flops(model, cfg.ffn_block_size, cfg.flops_seq)
    removed = float((heads * (~selection.mask.bool()).double()).sum())
    if selection.ffn_mask is not None:
        removed += float((blocks * (~selection.ffn_mask.bool()).double()).sum())
    return 1 - removed / flops_per_token(model, cfg.flops_seq)


# Study timing's phases of a training step: forward, backward, clipping, the optimizer's step, and the
# rest (zeroing the gradients, reading the loss, the final device sync).
_PHASES = ("forward", "backward", "clip", "optimizer", "rest")


def measure_step_time(ctx: Context) -> dict:
    """Training-step time of plain fine-tuning and of each gated method, interleaved step by step.

    Every configuration trains its own copy of the pretrained model on the same batches, with the
    same optimizer over the weights; gated steps add the gates' forward and backward and their
    optimizer group. The copies take turns one step at a time, the order rotating by one each
    cycle, so that a drift of the machine's speed falls on all of them alike: on an H200, rounds of
    100 steps of one configuration at a time moved by up to 20% from one round to the next, and the
    ratio of two configurations with them. The GPU is synchronized before each clock read.

    A pass is ``warmup + steps`` cycles; the gates take the study's options for a run of ``steps``
    (:func:`_gate_options`): DSP cools over ``dsp.cooldown_fraction`` of them, then holds, so a
    pass pays the soft top-K's steps and the saturated ones in their proportion. A pass's figure is
    each configuration's mean timed step; ``step_ms`` is the median over passes, ``step_ms_rounds``
    every pass's figure and ``step_ratio`` the median of each pass's ratio to its plain figure. An
    untimed pass goes first. With ``timing.sync_probes``, plain steps with a host sync mid-backward
    or after backward are timed too (``plain+sync-mid``, ``plain+sync-after``); with
    ``timing.hooks_probe``, plain steps through the mask hooks with a fixed all-ones mask
    (``plain+hooks``); with ``timing.gate_probes``, the same with that mask already on the device
    (``plain+hooks@device``) and each method with its gates out of clipping and the optimizer
    (``<method>+unstepped``). ``step_phase_ms`` splits each configuration's timed steps by where the host's
    clock stood (:data:`_PHASES`, means over every timed step): the host runs ahead of the device
    but for its syncs, so a phase is the host's time in it, plus any wait for the device there.
    """
    import torch

    from pipeline.architectures import attention_parts
    from pipeline.gates import GATES_ON, add_fixed_mask_, install_mask_hooks_
    from pipeline.methods import add_method_gates_
    from pipeline.training import clip_grad_norm_

    spec = ctx.config.timing
    first = ctx.pretrained(0)
    config = first.config
    total_heads = config.num_hidden_layers * config.num_attention_heads
    keep = total_heads // 2 if not ctx.config.per_layer else config.num_hidden_layers * (config.num_attention_heads // 2)
    source = ctx.train_batches(0)(0)
    batches = [b for _, b in zip(range(spec.steps + spec.warmup), source)]
    batches = [{k: v.to(ctx.device) for k, v in b.items()} for b in batches]
    use_bf16 = ctx.device.type == "cuda"

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    def trainer(model, gates_config, probe: str | None):
        """``step(i, batch)`` -> seconds: one training step of ``model`` (the configuration's own copy)."""
        gates = None
        if gates_config is not None:
            method, placement = gates_config
            os.environ[GATES_ON] = placement
            try:
                gates = add_method_gates_(model, method, keep, per_layer=ctx.config.per_layer, seed=0,
                                          **_gate_options(ctx, method, spec.steps)[1])
            finally:
                os.environ.pop(GATES_ON)
        model.train()
        groups = _weight_groups(model, 1e-8, 0.0)
        if gates is not None and probe != "unstepped":
            groups.append({"params": list(gates.parameters()), "lr": 1e-8, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups)
        params = [p for g in groups for p in g["params"]]
        if probe == "hooks":
            add_fixed_mask_(model, torch.ones(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64))
        if probe == "hooks@device":
            resident = torch.ones(config.num_hidden_layers, config.num_attention_heads, device=ctx.device)
            install_mask_hooks_(model, lambda: resident)
        if probe == "sync-mid":  # the first layer's attention output projection: where the mask's gradient is complete
            attention_parts(model)[0].output.weight.register_hook(lambda grad: (sync(), grad)[1])

        def step(i: int, batch: dict) -> tuple[float, ...]:
            """Seconds: the whole step, then the host's time in each of :data:`_PHASES`."""
            sync()
            clock = [time.perf_counter()]
            if gates is not None:
                gates.step = max(0, i - spec.warmup)
                if probe == "unstepped":
                    for p in gates.parameters():
                        p.grad = None  # as zero_grad would: no accumulation
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**batch).loss
            clock.append(time.perf_counter())
            loss.backward()
            if probe == "sync-after":
                sync()
            clock.append(time.perf_counter())
            clip_grad_norm_(params, 1.0)
            clock.append(time.perf_counter())
            optimizer.step()
            clock.append(time.perf_counter())
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            sync()
            clock.append(time.perf_counter())
            return (clock[-1] - clock[0], *(b - a for a, b in zip(clock, clock[1:])))

        return step

    # (name, (method, placement) or None for plain steps, the probe a plain step carries or None)
    order = [("plain", None, None),
             *((m if p == "auto" else f"{m}@{p}", (m, p), None) for m in spec.methods for p in spec.placements),
             *((("plain+sync-mid", None, "sync-mid"), ("plain+sync-after", None, "sync-after")) if spec.sync_probes else ()),
             *((("plain+hooks", None, "hooks"),) if spec.hooks_probe else ()),
             *((("plain+hooks@device", None, "hooks@device"),
                *((f"{m}+unstepped", (m, "auto"), "unstepped") for m in spec.methods)) if spec.gate_probes else ())]
    steps = {name: trainer(first if index == 0 else ctx.pretrained(0), gates_config, probe)
             for index, (name, gates_config, probe) in enumerate(order)}

    per_round: dict[str, list[float]] = {name: [] for name, _, _ in order}
    phases: dict[str, list[tuple[float, ...]]] = {name: [] for name, _, _ in order}
    for round_ in range(-1, spec.rounds):  # pass -1 is untimed: clocks rising from idle, lazy initialisation
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        for i, batch in enumerate(batches):
            turn = (i + max(round_, 0)) % len(order)
            for name, _, _ in order[turn:] + order[:turn]:
                took, *parts = steps[name](i, batch)
                if i >= spec.warmup:
                    seconds[name].append(took)
                    if round_ >= 0:
                        phases[name].append(parts)
        if round_ >= 0:
            for name, values in seconds.items():
                per_round[name].append(statistics.fmean(values))
    medians = {name: statistics.median(values) * 1e3 for name, values in per_round.items()}
    paired = {name: statistics.median(t / p for t, p in zip(values, per_round["plain"]))
              for name, values in per_round.items() if name != "plain"}
    profiles, counts = {}, {}
    if spec.profile:
        # About 20 of the timed steps, spread over the pass (DSP's soft top-K steps and saturated ones in
        # their proportion): with all 120 steps of 5 configurations profiled, a study timing call on an
        # H200 ran past 7 minutes and was stopped, where timing alone takes about 2.
        picks = range(spec.warmup, len(batches), max(1, spec.steps // 20))
        for name, _, probe in order:
            if probe in (None, "hooks"):  # the other probes are for timing; the hooks probe adds operators
                step = steps[name]
                profiles[name], counts[name] = _profile_steps(lambda: [step(i, batches[i]) for i in picks],
                                                              ctx.device, len(picks))
    return {"step_ms": {k: round(v, 3) for k, v in medians.items()},
            "step_ms_rounds": {k: [round(t * 1e3, 3) for t in values] for k, values in per_round.items()},
            "step_ratio": {name: round(ratio, 4) for name, ratio in paired.items()},
            "step_ratio_of_medians": {name: round(medians[name] / medians["plain"], 4) for name in paired},
            "step_phase_ms": {name: {phase: round(statistics.fmean(parts[j] for parts in rows) * 1e3, 3)
                                     for j, phase in enumerate(_PHASES)} for name, rows in phases.items()},
            "profiles": profiles, "profile_counts_per_step": counts, "timing_placements": list(spec.placements),
            "timing_batch_size": ctx.config.reference.batch_size, "timing_steps": spec.steps,
            "timing_rounds": spec.rounds, "timing_keep": keep,
            "timing_cooldown_steps": _gate_options(ctx, "dsp", spec.steps)[1]["cooldown_steps"],
            "timing_statistic": "configurations interleaved step by step (order rotating each cycle), one model "
                                "copy each; a pass's figure: mean timed step; step_ms: median over passes; "
                                "step_ratio: median over passes of the pass's ratio to plain; one untimed pass first"}


def _profile_steps(run, device, steps: int) -> tuple[list[dict], dict]:
    """The 15 operators with the most host (self CPU) time over ``run()``, with their device time, and
    per step: host events, kernel launches, host-device copies and stream synchronizations."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    events = prof.key_averages()
    table = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]

    def per_step(match) -> float:
        return round(sum(e.count for e in events if match(e.key)) / steps, 1)

    counts = {"events": per_step(lambda key: True), "kernel_launches": per_step(lambda key: "LaunchKernel" in key),
              "memcpy": per_step(lambda key: key == "cudaMemcpyAsync"),
              "stream_syncs": per_step(lambda key: key == "cudaStreamSynchronize")}
    return [{"name": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 3)} for e in table], counts


def run_job(ctx: Context, job: Job) -> dict:
    from benchmarks.timing import machine_info

    start = time.perf_counter()
    if job.kind == "reference":
        row = {**ctx.base_row(job), "variant": "reference", **train_reference(ctx, job.seed)}
    elif job.kind == "step_time":
        row = {**ctx.base_row(job), "variant": "step-time", **measure_step_time(ctx)}
    else:
        row = run_row(ctx, job)
    row.setdefault("wall_seconds", round(time.perf_counter() - start, 2))
    row["machine"] = machine_info()
    _append_row(ctx.row_file, row)
    return row


# --------------------------------------------------------------------------- orchestration


def _done_keys(out: Path) -> set[str]:
    return {row["key"] for row in read_rows([out]) if "key" in row}


def needs_reference(config: StudyConfig, variant: str) -> bool:
    """Rows that read the seed's fine-tuned reference: all but joint ones from the pretrained model,
    and those too when the reference teaches (``+kd``)."""
    joint_from_pretrained = parse_variant(variant)[1] == "joint" and config.joint.init == "pretrained"
    return not joint_from_pretrained or variant_distills(variant)


def plan(config: StudyConfig, out: Path, only, shard) -> tuple[list[Job], list[Job], list[Job]]:
    """(timing, references, rows) still to run, in that order of phases."""
    done = _done_keys(out)
    rows = [job for job in grid(config, only, shard) if job.key not in done]
    ref_seeds = sorted({job.seed for job in rows if needs_reference(config, job.variant)})
    references = [Job("reference", s) for s in ref_seeds
                  if Job("reference", s).key not in done or not (out / f"reference-seed{s}" / "config.json").is_file()]
    timing = [Job("step_time", 0)] if shard[0] == 0 and not only and Job("step_time", 0).key not in done else []
    return timing, references, rows


def run_in_process(config: StudyConfig, out: Path, jobs: list[Job], log=print) -> list[dict]:
    ctx = Context(config, out)
    rows = []
    for job in jobs:
        if job.kind == "row" and not _claim(out, job):
            continue
        row = run_job(ctx, job)
        rows.append(row)
        log(f"{job.key}: {row.get('value', row.get('step_ratio'))} ({row['wall_seconds']} s)")
    return rows


def _spawn_workers(out: Path, phase: str, count: int, threads: int) -> None:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    procs = []
    for index in range(count):
        mine = [cores[(index * threads + j) % len(cores)] for j in range(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "DSPRUNE_CORES": ",".join(map(str, mine))}
        cmd = [sys.executable, "-m", "benchmarks.study", "worker", str(out), "--phase", phase,
               "--index", str(index), "--count", str(count)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO_ROOT))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} {phase} worker(s) failed; rows written so far are kept (rerun with --resume)")


def run_study(config: StudyConfig, out: Path, *, only=None, shard=(0, 1), workers: int = 1, resume: bool = False,
              log=print) -> Path:
    """Run the grid (or its ``only``/``shard`` part) into ``out``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if read_rows([out]) and not resume:
        raise FileExistsError(f"{out} already holds rows: pass --resume to continue, or choose another --out")
    (out / "study-config.json").write_text(json.dumps(
        {"config": config.to_dict(), "only": {k: sorted(v) for k, v in (only or {}).items()}, "shard": list(shard)},
        indent=2))
    claims = out / "claims"
    if claims.exists():
        for stale in claims.iterdir():  # only finished rows count as done
            stale.unlink()
    timing, references, rows = plan(config, out, only, shard)
    log(f"{out}: {len(timing)} timing, {len(references)} reference and {len(rows)} grid jobs to run")
    if workers <= 1:
        run_in_process(config, out, timing + references + rows, log)
        return out
    if timing:
        _spawn_workers(out, "timing", 1, config.threads)
    if references:
        _spawn_workers(out, "reference", min(workers, len(references)), config.threads)
    if rows:
        _spawn_workers(out, "rows", min(workers, len(rows)), config.threads)
    return out


def worker_main(out: Path, phase: str, index: int, count: int) -> None:
    cores = os.environ.get("DSPRUNE_CORES")
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
    saved = json.loads((out / "study-config.json").read_text())
    config = study_config_from_dict(saved["config"], str(out / "study-config.json"))
    only = {k: set(v) for k, v in saved["only"].items()}
    timing, references, rows = plan(config, out, only, tuple(saved["shard"]))
    jobs = {"timing": timing, "reference": references[index::count], "rows": rows}[phase]
    run_in_process(config, out, jobs, log=lambda text: print(f"[worker {index}] {text}", flush=True))


# --------------------------------------------------------------------------- merge and report


def summarize(rows: list[dict]) -> dict:
    """Mean and sample std of the metric per (variant, K), the reference's, and the step-time rows."""
    latest = {row["key"]: row for row in rows if "key" in row}
    rows = list(latest.values())
    grid_rows = [r for r in rows if r["kind"] == "row"]
    # A "+ffn" row at K has the budget of K heads alone: the heads-only rows' FLOPs where they lack them.
    heads_only_flops = {r["keep"]: r["flops_budget"] for r in grid_rows
                        if variant_prunes_ffn(r["variant"]) and r.get("fraction") is None and "flops_budget" in r}
    grid_rows = [r if "flops_kept_fraction" in r or variant_prunes_ffn(r["variant"]) or r["keep"] not in heads_only_flops
                 else {**r, "flops_kept_fraction": heads_only_flops[r["keep"]]} for r in grid_rows]
    groups: dict[tuple[str, int, float], list[dict]] = {}
    for row in grid_rows:
        fraction = row.get("fraction")
        groups.setdefault((row["variant"], row["keep"], -1.0 if fraction is None else fraction), []).append(row)

    def stats(values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)}

    def cell(variant, keep, fraction, group):
        entry = {"variant": variant, "keep": keep, **stats([r["value"] for r in group])}
        if fraction >= 0:
            entry["fraction"] = fraction
        flops = [r["flops_kept_fraction"] for r in group if "flops_kept_fraction" in r]
        if flops:
            entry["flops_kept_fraction"] = statistics.fmean(flops)
        return entry

    references = [r["value"] for r in rows if r["kind"] == "reference"]
    return {
        "schema": SCHEMA_VERSION,
        "study": next((r["study"] for r in rows), None),
        "metric": next((r["metric"] for r in rows), None),
        "summary": [cell(v, k, f, group) for (v, k, f), group in sorted(groups.items())],
        "reference": stats(references) if references else None,
        "step_time": [r for r in rows if r["kind"] == "step_time"],
        "rows": sorted(grid_rows, key=lambda r: (r["variant"], -r["keep"], -(r.get("fraction") or 0), r["seed"])),
        "references": [r for r in rows if r["kind"] == "reference"],
    }


def markdown(result: dict) -> str:
    # "+ffn" rows have no head count of their own: they appear in the FLOPs table below.
    by_k = [s for s in result["summary"] if not variant_prunes_ffn(s["variant"])]
    keeps = sorted({s["keep"] for s in by_k}, reverse=True)
    variants = sorted({s["variant"] for s in by_k})
    cell = {(s["variant"], s["keep"]): s for s in by_k}
    metric = result["metric"]
    lines = [f"# {result['study']}: dev {metric} against heads kept (mean ± std over seeds)", ""]
    if result["reference"]:
        ref = result["reference"]
        lines += [f"Unpruned reference: {100 * ref['mean']:.2f} ± {100 * ref['std']:.2f} (n={ref['n']})", ""]
    lines.append("| variant | " + " | ".join(f"K={k}" for k in keeps) + " |")
    lines.append("|---|" + "---|" * len(keeps))
    for variant in variants:
        cells = []
        for k in keeps:
            s = cell.get((variant, k))
            cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={s['n']})" if s else "")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    # Each "+ffn" variant beside its heads-only counterpart (the same method and mode).
    counterparts = {s["variant"].replace(FFN_SUFFIX, "") for s in result["summary"] if variant_prunes_ffn(s["variant"])}
    with_flops = sorted((s for s in result["summary"] if "flops_kept_fraction" in s
                         and (variant_prunes_ffn(s["variant"]) or s["variant"] in counterparts)),
                        key=lambda s: (-s["flops_kept_fraction"], s["variant"]))
    if any(variant_prunes_ffn(s["variant"]) for s in with_flops):
        lines += ["", f"## Dev {metric} against FLOPs kept (per token at the study's flops_seq)", "",
                  "`+ffn` variants keep heads and feed-forward blocks under one FLOP budget: at K, the FLOPs of "
                  "K heads alone (the heads-only rows' cost); at f, that share of the model's FLOPs.", "",
                  "| variant | budget | FLOPs kept | " + metric + " |", "|---|---|---|---|"]
        for s in with_flops:
            budget = f"f={s['fraction']:g}" if "fraction" in s else f"K={s['keep']}"
            lines.append(f"| {s['variant']} | {budget} | {100 * s['flops_kept_fraction']:.1f}% | "
                         f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={s['n']}) |")
    for timing in result["step_time"]:
        ratios = ", ".join(f"{m} {100 * (r - 1):+.1f}%" for m, r in timing["step_ratio"].items())
        ratios = ratios or "no gated method timed"
        placements = timing.get("timing_placements")
        where = f"; gates on {placements[0]}, or as marked after @" if placements else ""
        lines += ["", f"Training step vs plain fine-tuning ({timing.get('gpu') or timing['device']}, "
                      f"plain {timing['step_ms']['plain']:.2f} ms/step{where}): {ratios}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_ffn = any(variant_prunes_ffn(s["variant"]) for s in result["summary"])
    fig, axes = plt.subplots(1, 2 if with_ffn else 1, figsize=(13 if with_ffn else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    by_k = [s for s in result["summary"] if not variant_prunes_ffn(s["variant"])]
    for variant in sorted({s["variant"] for s in by_k}):
        points = sorted((s["keep"], s["mean"], s["std"]) for s in by_k if s["variant"] == variant)
        ks, means, stds = zip(*points)
        ax.errorbar(ks, [100 * m for m in means], yerr=[100 * s for s in stds], marker="o", capsize=3, label=variant)
    if result["reference"]:
        ax.axhline(100 * result["reference"]["mean"], color="black", linestyle="--", label="unpruned")
    ax.set_xlabel("heads kept (K)")
    ax.set_ylabel(f"dev {result['metric']} (%)")
    ax.set_title(result["study"] or "study")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if with_ffn:
        flops_ax = axes[0][1]
        counterparts = {s["variant"].replace(FFN_SUFFIX, "") for s in result["summary"] if variant_prunes_ffn(s["variant"])}
        for variant in sorted({s["variant"] for s in result["summary"] if "flops_kept_fraction" in s
                               and (variant_prunes_ffn(s["variant"]) or s["variant"] in counterparts)}):
            points = sorted((s["flops_kept_fraction"], s["mean"], s["std"]) for s in result["summary"]
                            if s["variant"] == variant and "flops_kept_fraction" in s)
            xs, means, stds = zip(*points)
            flops_ax.errorbar([100 * x for x in xs], [100 * m for m in means], yerr=[100 * s for s in stds], marker="o",
                              capsize=3, label=variant, linestyle="-" if variant_prunes_ffn(variant) else ":")
        if result["reference"]:
            flops_ax.axhline(100 * result["reference"]["mean"], color="black", linestyle="--", label="unpruned")
        flops_ax.set_xlabel("FLOPs per token kept (%)")
        flops_ax.set_ylabel(f"dev {result['metric']} (%)")
        flops_ax.set_title("heads + feed-forward blocks vs heads only, by FLOPs")
        flops_ax.grid(alpha=0.3)
        flops_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths, results_dir: Path, name: str | None = None) -> dict[str, Path]:
    """Merge row files into ``{name}.json``, ``{name}.md`` and ``{name}.png`` under ``results_dir``."""
    rows = read_rows(paths)
    if not rows:
        raise ValueError(f"no rows in {', '.join(map(str, paths))}")
    result = summarize(rows)
    name = result["study"] = name or result["study"]  # rows of several studies merge under the given name
    results_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": results_dir / f"{name}.json", "md": results_dir / f"{name}.md", "png": results_dir / f"{name}.png"}
    files["json"].write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    files["md"].write_text(markdown(result))
    plot(result, files["png"])
    return files


# --------------------------------------------------------------------------- command line


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.study merge")
        parser.add_argument("paths", nargs="+", help="run folders or rows*.jsonl files")
        parser.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results"))
        parser.add_argument("--name", default=None, help="file stem; the rows' study name by default")
        args = parser.parse_args(argv[1:])
        for kind, path in merge(args.paths, Path(args.results), args.name).items():
            print(f"{kind}: {path}")
        return 0
    if argv[:1] == ["timing"]:  # the training-step timing row alone, on an otherwise idle device
        parser = argparse.ArgumentParser(prog="python -m benchmarks.study timing")
        parser.add_argument("-c", "--config", required=True)
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--out", required=True, help="folder for the row (rows-PID.jsonl)")
        args = parser.parse_args(argv[1:])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        row = run_job(Context(load_study_config(args.config, args.overrides), out), Job("step_time", 0))
        print(json.dumps({k: row[k] for k in ("step_ms", "step_ratio")}))
        return 0
    if argv[:1] == ["worker"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.study worker")
        parser.add_argument("out")
        parser.add_argument("--phase", choices=("timing", "reference", "rows"), required=True)
        parser.add_argument("--index", type=int, default=0)
        parser.add_argument("--count", type=int, default=1)
        args = parser.parse_args(argv[1:])
        worker_main(Path(args.out), args.phase, args.index, args.count)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", default=None, help="e.g. method=dsp,k=36,seed=0")
    parser.add_argument("--out", default=None, help="run folder (the config's out_dir by default)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: run every n-th grid row from i")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the device")
    parser.add_argument("--resume", action="store_true", help="skip rows already in the run folder")
    args = parser.parse_args(argv)
    from pipeline.config import ConfigError

    try:
        config = load_study_config(args.config, args.overrides)
        only = parse_only(args.only)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or config.out_dir)
    try:
        run_study(config, out, only=only, shard=args.shard, workers=args.workers, resume=args.resume)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"rows in {out}; merge with: python -m benchmarks.study merge {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
