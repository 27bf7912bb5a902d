"""The dsprune command line. Thin: parse, call one library function, print a summary.

Exit codes: 0 success; 1 a gate failed (accuracy, speed or parity bound); 2 bad input.
Heavy imports happen inside commands so ``dsprune --help`` is instant.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

# No network at run time: the Hugging Face libraries must never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _bad_input_types():
    from pipeline.architectures import UnsupportedModelError
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.models import ModelSourceError
    from pipeline.run import ArtifactError, StorageError
    from pipeline.surgery import CheckpointError

    return (ConfigError, DataError, ModelSourceError, CheckpointError, UnsupportedModelError, ArtifactError,
            StorageError,
            FileNotFoundError, PermissionError, ValueError)


def _gate_types():
    from exporters.onnx import ParityError
    from pipeline.run import GateFailed

    return (GateFailed, ParityError)


def _exit(obj: dict, event: str, message: str, code: int, error: BaseException, level: str = "error"):
    from pipeline.events import Event

    obj["log"](Event(event, message, level=level, fields={"exit_code": code, "error": error.__class__.__name__}))
    sys.exit(code)


def _guarded(obj: dict, action):
    """Run ``action`` and map failures to the documented exit codes with one-line messages."""
    try:
        return action()
    except KeyboardInterrupt as err:
        _exit(obj, "run.interrupted", "dsprune: interrupted; finished stages are kept and the next run resumes",
              130, err, level="warning")
    except Exception as err:  # noqa: BLE001 - mapped to exit codes below
        if obj["debug"]:
            raise
        message = " ".join(str(err).split())  # one line, whatever the library wrote
        if isinstance(err, _gate_types()):
            _exit(obj, "gate.fail", f"dsprune: gate failed: {message}", 1, err)
        if isinstance(err, _bad_input_types()):
            _exit(obj, "run.error", f"dsprune: error: {message}", 2, err)
        raise


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines; errors and the summary only.")
@click.option("--log-format", type=click.Choice(["human", "json"]), default="human", show_default=True,
              envvar="DSPRUNE_LOG_FORMAT", show_envvar=True,
              help="Stage events and errors on stderr as text lines, or as one JSON object per line for CI "
                   "(ts, level, event, stage, message, fields).")
@click.pass_context
def main(ctx, debug, quiet, log_format):
    """Differentiable Subset Pruning: fine-tune with head gates, prune to exactly K heads, ship ONNX."""
    from pipeline.events import capture_warnings, make_logger

    if quiet or log_format == "json":  # a progress bar would break the one-object-per-line stream
        os.environ["DSPRUNE_PROGRESS"] = "0"
    log = make_logger(log_format, quiet=quiet)
    if log_format == "json":
        capture_warnings(log)
    ctx.obj = {"debug": debug, "log": log}


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML config (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, e.g. prune.keep=24.")
@click.option("--force", is_flag=True, help="Rerun every stage even when up to date.")
@click.pass_context
def run(ctx, config_path, overrides, force):
    """Run every stage; stages whose config and inputs are unchanged are skipped."""

    def action():
        from pipeline.config import load_config
        from pipeline.run import run_pipeline

        cfg = load_config(config_path, overrides)
        folder = run_pipeline(cfg, force=force, log=ctx.obj["log"])
        return folder

    folder = _guarded(ctx.obj, action)
    if _is_main_process():
        _log_finish(ctx.obj, folder.path)
        _print_summary(folder.path)


def _is_main_process() -> bool:
    from pipeline.distributed import is_main_process

    return is_main_process()


def _log_finish(obj: dict, run_dir: Path) -> None:
    """The run's last event: where its report is and how each gate came out."""
    import json

    from pipeline.events import Event

    report = run_dir / "report" / "report.json"
    gates = json.loads(report.read_text()).get("gates", []) if report.is_file() else []
    obj["log"](Event("run.finish", f"[run] complete: {run_dir}", fields={
        "run_dir": str(run_dir), "report": str(report) if report.is_file() else None, "gates": gates}))


def _print_summary(run_dir: Path) -> None:
    import json

    report = run_dir / "report" / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        metric = data["task"]["metric"]
        for stage in data["stages"]:
            click.echo(f"  {stage['stage']:<11} {metric} {stage['metric']:.4f}  ({-100 * stage['drop']:+.2f} pts vs fine-tuned)")
        for s in data["speedups"]:
            if s["variant"].startswith("pruned/"):
                click.echo(f"  {s['variant']:<18} batch {s['batch']:>3}: {s['p50_ratio']:.2f}x vs {s['reference']}")
        if "budget" in data:
            budget = data["budget"]
            gate, units = budget["gate"], budget.get("units")
            planned = (f"{budget['planned_keep']} heads planned" if not units else
                       f"{units['budget_ms']:.3f} ms of heads and blocks planned, "
                       f"{budget['measured']['keep']} heads and {budget['measured']['blocks']} blocks kept")
            click.echo(f"  budget: {planned}; {gate['name']}: "
                       f"{gate['value']:.4g} vs bound {gate['bound']:.4g}, {'met' if gate['passed'] else 'MISSED'}")
        click.echo(f"Report: {run_dir / 'report' / 'report.md'}")


@main.command(name="plan")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML config with a budget section (see configs/sst2-minilm-budget.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, e.g. budget.latency_fraction=0.85.")
@click.option("--force", is_flag=True, help="Measure the cost table again even when the run folder holds one.")
@click.pass_context
def plan(ctx, config_path, overrides, force):
    """Plan K for the config's latency budget, without training: the cost table, its fit, K, the curve.

    The cost table is measured on this machine (or reused from the run folder) and kept there, so a
    later `dsprune run` with the same config skips the measurement. Exits 2 when the budget is out
    of reach, after printing the curve.
    """

    def action():
        from pipeline.config import ConfigError, load_config
        from pipeline.run import plan_budget, prepare_run_folder
        from pipeline.stages.plan import read_costs, read_plan

        cfg = load_config(config_path, overrides)
        if not cfg.budget.active:
            raise ConfigError(f"{config_path}: budget: no target set; set budget.latency_ms, "
                              "budget.latency_fraction or budget.throughput_per_s")
        folder = prepare_run_folder(cfg)
        plan_budget(folder, cfg, force=force, log=ctx.obj["log"], refuse=False)
        return read_plan(folder.path), read_costs(folder.path)

    planned, costs = _guarded(ctx.obj, action)
    from pipeline.stages.plan import describe

    for line in describe(planned, costs):
        click.echo(line)
    if not planned["reachable"]:
        click.echo(f"dsprune: error: {planned['message']}", err=True)
        sys.exit(2)


def _stage_command(name: str):
    @click.argument("run_dir", type=click.Path(file_okay=False))
    @click.pass_context
    def command(ctx, run_dir):
        def action():
            from pipeline.distributed import launched
            from pipeline.run import RunFolder, check_gates

            stage = _lookup(name)
            if launched().enabled and not stage.distributed:
                raise ValueError(f"dsprune {name} runs in one process; under torchrun or accelerate launch, "
                                 "run `dsprune finetune RUN_DIR` or `dsprune run -c CONFIG`")
            folder = RunFolder(Path(run_dir))
            cfg = folder.config()
            folder.run_stage(stage, cfg, log=ctx.obj["log"])
            if name == "report":
                check_gates(folder)
            return folder

        folder = _guarded(ctx.obj, action)
        if name == "report":
            _print_summary(folder.path)

    command.__doc__ = f"Run the {name} stage alone on RUN_DIR (its earlier stages must be complete)."
    return main.command(name=name)(command)


@main.command()
@click.argument("old_report", type=click.Path(dir_okay=False))
@click.argument("new_report", type=click.Path(dir_okay=False))
@click.option("--metric-tolerance", default=0.005, show_default=True, help="Allowed metric drop (metric units).")
@click.option("--latency-tolerance", default=0.10, show_default=True, help="Allowed p50 increase (fraction).")
@click.pass_context
def compare(ctx, old_report, new_report, metric_tolerance, latency_tolerance):
    """Print the regressions of NEW_REPORT against OLD_REPORT (report.json files); exit 1 if any."""

    def action():
        import json

        from benchmarks.report import compare_reports, validate_report

        reports = []
        for path in (old_report, new_report):
            try:
                report = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: not a readable report.json ({err.__class__.__name__})") from None
            try:
                validate_report(report)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
            reports.append(report)
        return compare_reports(*reports, metric_tolerance=metric_tolerance, latency_tolerance=latency_tolerance)

    regressions = _guarded(ctx.obj, action)
    for line in regressions:
        click.echo(line)
    if regressions:
        from pipeline.events import Event

        ctx.obj["log"](Event("compare.regressions", f"dsprune: {len(regressions)} regression(s) against {old_report}",
                             level="error", fields={"exit_code": 1, "old": old_report, "new": new_report,
                                                    "regressions": regressions}))
        sys.exit(1)
    click.echo(f"No regressions against {old_report}.")


def _lookup(name):
    from pipeline.run import STAGES

    return next(s for s in STAGES if s.name == name)


for _name in ("finetune", "harden", "prune", "export", "quantize", "bench", "report", "artifact"):
    _stage_command(_name)


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.argument("texts", nargs=-1)
@click.option("--file", "text_file", type=click.File("r"), help="One text per line ('-' for stdin); a pair task "
              "takes 'first<TAB>second'.")
@click.option("--format", "output_format", type=click.Choice(["jsonl", "table"]), default="jsonl", show_default=True)
@click.option("--variant", default="model.onnx", show_default=True, help="ONNX file of the artifact to run.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime threads (default: its own).")
@click.pass_context
def predict(ctx, artifact, texts, text_file, output_format, variant, batch_size, threads):
    """Label TEXTS (or the lines of --file) with an artifact folder (RUN/artifact): label and score per text."""
    texts = list(texts) + ([line.rstrip("\n") for line in text_file if line.strip()] if text_file else [])
    if not texts:
        raise click.UsageError("give TEXT arguments or --file")

    def action():
        from exporters.artifact import load_artifact

        return load_artifact(artifact, file=variant, threads=threads).predict(texts, batch_size=batch_size)

    predictions = _guarded(ctx.obj, action)
    if output_format == "table":
        from exporters.artifact import format_table

        click.echo(format_table(predictions))
    else:
        import json

        for p in predictions:
            click.echo(json.dumps(p, ensure_ascii=False))


if __name__ == "__main__":
    main()
