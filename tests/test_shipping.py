"""Shipping: structured (JSON) logs of every stage event."""
from __future__ import annotations

import json
import os
import re
import sys
import types
import warnings
from datetime import datetime

import pytest
from click.testing import CliRunner

from conftest import ROOT, copy_run, run_cli

EVENT_KEYS = {"ts", "level", "event", "stage", "message", "fields"}


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
