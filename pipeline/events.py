"""What a run reports while it works, and the two formats it is written in.

The run folder logic reports every stage start, skip, finish and failure as an :class:`Event`
through a ``log`` callable. ``str(event)`` is the human line (``[prune] done in 1.2s``), so a plain
``log=print`` keeps working; :func:`make_logger` writes the same events either as those lines or,
for CI systems, as one JSON object per line with ``ts``, ``level``, ``event``, ``stage``,
``message`` and ``fields``.
"""
from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

LOG_FORMATS = ("human", "json")
LEVELS = ("debug", "info", "warning", "error")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One thing that happened, e.g. ``Event("stage.finish", "[bench] done in 3.1s", stage="bench")``.

    Args:
        event: dotted name a CI system filters on: ``stage.start``, ``stage.skip``, ``stage.finish``,
            ``stage.fail``, ``run.finish``, ``run.error``, ``gate.fail``, ``warning``...
        message: the line a person reads.
        stage: the pipeline stage it concerns, if any.
        level: one of ``LEVELS``.
        fields: JSON-serializable details (seconds, the stage's summary, an exit code).
    """

    event: str
    message: str
    stage: str | None = None
    level: str = "info"
    fields: dict = field(default_factory=dict)
    ts: str = field(default_factory=_now)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"event level {self.level!r}: must be one of {', '.join(LEVELS)}")

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> str:
        record = {"ts": self.ts, "level": self.level, "event": self.event, "stage": self.stage,
                  "message": self.message, "fields": self.fields}
        # default=str: a stage summary may hold a Path or a numpy scalar; a log line must never fail.
        return json.dumps(record, default=str, ensure_ascii=False)


def stage_started(stage: str) -> Event:
    return Event("stage.start", f"[{stage}] running", stage=stage)


def stage_skipped(stage: str) -> Event:
    return Event("stage.skip", f"[{stage}] up to date, skipped", stage=stage, fields={"reason": "up to date"})


def stage_finished(stage: str, seconds: float, summary: dict) -> Event:
    return Event("stage.finish", f"[{stage}] done in {seconds:.1f}s", stage=stage,
                 fields={"seconds": round(seconds, 2), "summary": summary})


def stage_failed(stage: str, seconds: float, error: BaseException) -> Event:
    message = " ".join(str(error).split())
    return Event("stage.fail", f"[{stage}] failed after {seconds:.1f}s ({error.__class__.__name__})", stage=stage,
                 level="error",
                 fields={"seconds": round(seconds, 2), "error": error.__class__.__name__, "detail": message})


def make_logger(log_format: str = "human", *, quiet: bool = False,
                stream=None) -> Callable[[Event | str], None]:
    """A ``log`` callable for the run folder logic and the CLI.

    Args:
        log_format: ``human`` (the message alone) or ``json`` (one JSON object per line).
        quiet: drop ``debug`` and ``info`` events; warnings and errors still show.
        stream: where lines go; ``None`` means ``sys.stderr`` at the time of each call.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: must be one of {', '.join(LOG_FORMATS)}")

    def log(event: Event | str) -> None:
        if not isinstance(event, Event):  # a plain message from a caller that predates events
            event = Event("message", str(event))
        if quiet and LEVELS.index(event.level) < LEVELS.index("warning"):
            return
        line = event.to_json() if log_format == "json" else str(event)
        out = stream if stream is not None else sys.stderr
        out.write(line + "\n")
        out.flush()

    return log


def capture_warnings(log: Callable[[Event], None]) -> None:
    """Send Python warnings through ``log`` as ``warning`` events, so a JSON log stays all JSON."""

    def show(message, category, filename, lineno, file=None, line=None):
        log(Event("warning", f"{category.__name__}: {message}", level="warning",
                  fields={"category": category.__name__, "file": filename, "line": lineno}))

    warnings.showwarning = show
