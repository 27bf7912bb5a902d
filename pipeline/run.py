"""The ordered stages, the run folder, manifest.json, and the resume/skip logic.

Each stage writes into ``RUN/.<stage>.tmp`` and only a complete stage is renamed to ``RUN/<stage>``
and recorded in the manifest, so an interrupted or failed stage leaves earlier ones intact and the
next ``dsprune run`` resumes from the last complete stage.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import RunConfig, config_from_dict
from pipeline.events import Event, stage_failed, stage_finished, stage_skipped, stage_started
from pipeline.files import sha256_file, write_json_atomic  # noqa: F401 - stages import it from here


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # pipeline.stages.<module>, whose run(cfg, run_dir, out) does the work
    needs: tuple[str, ...]  # stages whose outputs it reads
    sections: tuple[str, ...]  # config sections that change its outputs
    distributed: bool = False  # runs on every process of a torchrun / accelerate launch


# Before STAGES, only with a budget target: measures a cost table and plans prune.keep, which
# run_pipeline then applies to the config every later stage gets (plan_budget).
PLAN_STAGE = Stage("plan", "plan", (), ("model", "data", "prune", "export", "quantize", "bench", "budget"))
STAGES: tuple[Stage, ...] = (
    Stage("finetune", "finetune", (), ("model", "data", "finetune", "prune", "threads"), distributed=True),
    Stage("harden", "harden", ("finetune",), ("prune",)),
    Stage("prune", "prune", ("finetune", "harden"), ()),
    Stage("export", "export", ("finetune", "prune"), ("export",)),
    Stage("quantize", "quantize", ("export",), ("quantize", "export")),  # export.parity_atol checks fused graphs
    Stage("bench", "bench", ("finetune", "prune", "export", "quantize"), ("bench", "budget")),  # + the budget's shape
    Stage("report", "report", ("finetune", "harden", "prune", "export", "quantize", "bench"), ("gates", "budget")),
    # artifact times the variants with bench's settings to pick model.onnx
    Stage("artifact", "artifact", ("finetune", "prune", "export", "quantize", "bench"), ("data", "quantize", "bench")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


class GateFailed(RuntimeError):
    """A configured accuracy or speed bound was crossed (exit code 1)."""


class StorageError(RuntimeError):
    """The disk filled up (or a file-size limit was hit) while a stage wrote its outputs."""


class ArtifactError(ValueError):
    """A stage's input no longer matches what the manifest recorded (corrupted or edited)."""


def hash_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("dsprune", "torch", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _silent(event) -> None:
    pass


class RunFolder:
    """A run folder: the resolved config, one subfolder per stage, and manifest.json."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict:
        if self.manifest_path.is_file():
            return json.loads(self.manifest_path.read_text())
        return {"stages": {}}

    def config(self) -> RunConfig:
        path = self.path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; is {self.path} a dsprune run folder?")
        return config_from_dict(json.loads(path.read_text()))

    def stage_dir(self, name: str) -> Path:
        return self.path / name

    def is_current(self, stage: Stage, cfg: RunConfig) -> bool:
        """True when the stage's recorded config hash, inputs and outputs all still hold."""
        record = self.manifest()["stages"].get(stage.name)
        if not record or record.get("config_hash") != cfg.section_hash(*stage.sections):
            return False
        if record.get("inputs") != self._input_hashes(stage):
            return False
        folder = self.stage_dir(stage.name)
        return folder.is_dir() and hash_tree(folder) == record.get("outputs")

    def verify_inputs(self, stage: Stage) -> None:
        """Check every input file against the sha256 its stage recorded.

        Raises:
            ArtifactError: naming the first file that is missing, truncated or changed.
        """
        stages = self.manifest()["stages"]
        for need in stage.needs:
            recorded = stages[need]["outputs"]
            folder = self.stage_dir(need)
            for name, digest in recorded.items():
                path = folder / name
                if not path.is_file():
                    raise ArtifactError(f"{path}: missing; rerun `dsprune run` to rebuild stage {need}")
                if sha256_file(path) != digest:
                    raise ArtifactError(f"{path}: sha256 differs from manifest.json (corrupted or modified "
                                        f"since stage {need} wrote it); rerun `dsprune run` to rebuild it")

    def _input_hashes(self, stage: Stage) -> dict[str, str]:
        stages = self.manifest()["stages"]
        return {
            f"{need}/{name}": digest
            for need in stage.needs
            for name, digest in stages.get(need, {}).get("outputs", {}).items()
        }

    def run_stage(self, stage: Stage, cfg: RunConfig, log=print) -> dict:
        """Run one stage into place and record it; ``log`` receives its start, finish or failure event."""
        missing = [n for n in stage.needs if n not in self.manifest()["stages"]]
        if missing:
            raise FileNotFoundError(f"{self.path}: stage {stage.name} needs {', '.join(missing)} to run first")
        from pipeline.distributed import is_main_process  # here: it imports torch

        if not is_main_process():
            log = _silent  # one set of stage lines per launch: rank 0's
        log(stage_started(stage.name))
        started = time.time()
        try:
            summary = self._run_and_record(stage, cfg, started)
        except BaseException as err:
            log(stage_failed(stage.name, time.time() - started, err))
            raise
        log(stage_finished(stage.name, time.time() - started, summary))
        return summary

    def _run_and_record(self, stage: Stage, cfg: RunConfig, started: float) -> dict:
        from pipeline.distributed import is_main_process

        self.verify_inputs(stage)
        module = importlib.import_module(f"pipeline.stages.{stage.module}")

        if not is_main_process():
            # Ranks other than 0 of a launch train alongside rank 0 and touch nothing in the folder.
            if not stage.distributed:
                raise ValueError(f"stage {stage.name} runs in one process, on rank 0 of a launch")
            module.run(cfg, self.path, None)
            return {}
        tmp = self.path / f".{stage.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            summary = module.run(cfg, self.path, tmp) or {}
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise StorageError(f"{self.path}: stage {stage.name} could not write its outputs ({err.strerror}); "
                                   "earlier stages are intact, free space and rerun") from err
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.stage_dir(stage.name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        manifest = self.manifest()
        manifest["stages"][stage.name] = {
            "config_hash": cfg.section_hash(*stage.sections),
            "inputs": self._input_hashes(stage),
            "outputs": hash_tree(final),
            "seed": cfg.seed,
            "versions": versions(),
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 2),
            "summary": summary,
        }
        write_json_atomic(self.manifest_path, manifest)
        return summary

def prepare_run_folder(cfg: RunConfig) -> RunFolder:
    """Create the run folder (checking it is writable) and store the resolved config in it."""
    folder = RunFolder(Path(cfg.run_dir))
    try:
        folder.path.mkdir(parents=True, exist_ok=True)
        probe = folder.path / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"run_dir: {cfg.run_dir!r} is not writable ({err.strerror})") from None
    write_json_atomic(folder.path / "config.json", cfg.to_dict())
    return folder


def run_pipeline(cfg: RunConfig, *, only: str | None = None, force: bool = False, log=print) -> RunFolder:
    """Walk the stages in order, skipping those whose config and inputs are unchanged.

    Under a multi-process launch (torchrun, accelerate launch) every process walks the distributed
    stages (finetune) together, and the ranks other than 0 return after them: rank 0 alone writes
    the folder and runs the remaining stages.

    Args:
        only: run just this stage (always, even when current).
        force: rerun every stage.
        log: receives a ``pipeline.events.Event`` per stage start, skip, finish and failure
            (``str(event)`` is the human line).

    With a ``budget`` target, the plan stage runs first and its K becomes ``prune.keep``.

    Raises:
        GateFailed: from the report stage when a configured bound (the budget included) is crossed.
        BudgetUnreachable: the budget is predicted out of reach; raised before any training.
        ValueError: a budget under a multi-process launch without a current plan (``dsprune plan`` first).
    """
    from pipeline.distributed import launched  # here: it imports torch

    dist = launched()
    main = dist.is_main
    folder = RunFolder(Path(cfg.run_dir))
    if cfg.budget.active and dist.enabled and (force or not folder.is_current(PLAN_STAGE, cfg)):
        # Rank 0 would time the cost table for minutes while the other ranks read a plan not yet
        # written (or an old one): every rank sees the same folder and stops with the same line.
        raise ValueError(f"budget: {dist.world_size} processes launched, and training one needs a current plan in "
                         f"{folder.path / 'plan'} first (its cost table is timed in one process): run "
                         "`dsprune plan -c CONFIG` with the same settings, then launch without --force")
    if main:
        folder = prepare_run_folder(cfg)
    else:
        log = _silent
    if cfg.budget.active and only is None and main:
        cfg = plan_budget(folder, cfg, force=force, log=log)
    elif cfg.budget.active:
        from pipeline.stages.plan import planned_config

        cfg = planned_config(cfg, folder.path)  # a single later stage (or another rank) trains the planned K
    for stage in STAGES:
        if only is not None and stage.name != only:
            continue
        if not main and not stage.distributed:
            continue
        if only is None and not force and folder.is_current(stage, cfg):
            log(stage_skipped(stage.name))
            continue
        folder.run_stage(stage, cfg, log=log)
    if main:
        check_gates(folder)
    return folder


def plan_budget(folder: RunFolder, cfg: RunConfig, *, force: bool = False, log=print, refuse: bool = True) -> RunConfig:
    """Run (or skip, when current) the plan stage and return ``cfg`` with the planned K as ``prune.keep``.

    The resolved config, planned K included, replaces ``config.json`` so that single-stage commands
    on the folder train and harden the same K.

    Args:
        force: measure the cost table again even when the run folder holds one measured the same way.
        refuse: raise when the budget is out of reach, and log the planned K and any warning about the
            cost table (``dsprune plan`` passes False: it prints the whole plan, curve included).

    Raises:
        BudgetUnreachable: ``refuse`` and no allowed K is predicted to meet the budget (exit 2).
    """
    from pipeline.budget import BudgetUnreachable
    from pipeline.stages.plan import planned_config, read_plan

    stage = PLAN_STAGE
    if force:
        shutil.rmtree(folder.stage_dir(stage.name), ignore_errors=True)  # drops the cached cost table
    if not force and folder.is_current(stage, cfg):
        log(stage_skipped(stage.name))
    else:
        folder.run_stage(stage, cfg, log=log)  # logs its own start and finish
    plan = read_plan(folder.path)
    if refuse:
        for warning in plan.get("warnings", []):
            log(Event("plan.warning", f"[{stage.name}] warning: {warning}", stage=stage.name, level="warning"))
    try:
        planned = planned_config(cfg, folder.path)
    except BudgetUnreachable:
        if refuse:
            raise
        return cfg
    write_json_atomic(folder.path / "config.json", planned.to_dict())
    if refuse:
        ffn = planned.prune.ffn
        what = (f"prune.keep = {planned.prune.keep}" if "units" not in plan else
                f"prune.ffn.cost_budget = {ffn.cost_budget:.3f} ms of heads ({ffn.head_cost:.4f} ms each) and "
                f"blocks ({ffn.block_cost:.4f} ms each)")
        log(Event("plan.keep", f"[{stage.name}] {what}: predicted "
                  f"{plan['statistic'].removesuffix('_ms')} {plan['predicted_ms']:.3f} ms against "
                  f"{plan['target']['latency_ms']:.3f} ms with a {plan['target']['margin']:.0%} margin "
                  f"(fit max error {plan['fit']['max_rel_error']:.1%})", stage=stage.name,
                  fields={"keep": plan["keep"], "cost_budget_ms": ffn.cost_budget, "predicted_ms": plan["predicted_ms"],
                          "target_ms": plan["target"]["latency_ms"]}))
    return planned


def check_gates(folder: RunFolder) -> None:
    """Raise GateFailed when the run's report records a crossed bound."""
    report = folder.path / "report" / "report.json"
    if not report.is_file():
        return
    failed = [g for g in json.loads(report.read_text()).get("gates", []) if not g["passed"]]
    if failed:
        raise GateFailed("; ".join(f"gate {g['name']}: {g['value']:.4g} vs bound {g['bound']:.4g}" for g in failed))
