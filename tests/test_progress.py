"""Progress bars show on a terminal only, never under DSPRUNE_PROGRESS=0 (dsprune --quiet) or in logs."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios

import pytest

from pipeline import progress
from pipeline.progress import progress_bar, progress_enabled, track


@pytest.fixture
def terminal(monkeypatch):
    """A function that points stderr at a pseudo-terminal and returns a reader of what was written.

    Call it in the test body: pytest's own capture resets sys.stderr between setup and call.
    """
    master, slave = pty.openpty()
    # A new pty is 0 x 0, and tqdm draws nothing that narrow; a real terminal has a size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    stream = os.fdopen(slave, "w")
    os.set_blocking(master, False)

    def read() -> str:
        stream.flush()
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def attach():
        monkeypatch.setattr(sys, "stderr", stream)
        return read

    yield attach
    monkeypatch.undo()
    stream.close()
    os.close(master)


def _run_bar():
    with progress_bar(3, "demo-loop") as bar:
        for _ in range(3):
            bar.update(1)


def test_bar_shows_on_a_terminal(terminal, monkeypatch):
    monkeypatch.delenv("DSPRUNE_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0)  # redraw on every tick
    read = terminal()
    assert progress_enabled()
    _run_bar()
    shown = read()
    assert "demo-loop" in shown and "3/3" in shown


def test_no_bar_on_a_terminal_under_quiet(terminal, monkeypatch):
    monkeypatch.setenv("DSPRUNE_PROGRESS", "0")
    read = terminal()
    assert not progress_enabled()
    _run_bar()
    assert read() == ""


def test_no_bar_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("DSPRUNE_PROGRESS", raising=False)
    assert not progress_enabled()
    _run_bar()
    assert list(track(["a", "b"], 2, "demo-track")) == ["a", "b"]
    assert capsys.readouterr().err == ""


def test_forced_bar_prints_without_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("DSPRUNE_PROGRESS", "0")
    with progress_bar(2, "forced", enabled=True) as bar:
        bar.update(2)
    assert "forced" in capsys.readouterr().err


def test_quiet_flag_turns_bars_off(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.delenv("DSPRUNE_PROGRESS", raising=False)
    missing = str(tmp_path / "missing.json")
    CliRunner().invoke(main, ["--quiet", "compare", missing, missing])
    assert os.environ.get("DSPRUNE_PROGRESS") == "0"


def test_static_calibration_ticks_a_bar(terminal, monkeypatch, tmp_path):
    import torch
    from conftest import make_tiny_bert

    from exporters.onnx import export_onnx
    from exporters.quantize import quantize

    monkeypatch.delenv("DSPRUNE_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0)  # redraw on every tick
    onnx_path = export_onnx(make_tiny_bert(), tmp_path / "tiny.onnx")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 2000, (2, 8), generator=g),
                "attention_mask": torch.ones(2, 8, dtype=torch.long),
                "token_type_ids": torch.zeros(2, 8, dtype=torch.long)} for _ in range(3)]
    read = terminal()
    quantize(onnx_path, tmp_path / "tiny-int8-static.onnx", "int8-static", calibration=batches)
    shown = read()
    assert "calibrate tiny.onnx" in shown and "3/3" in shown  # one tick per calibration batch
