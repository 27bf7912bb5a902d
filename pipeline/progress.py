"""Progress bars for the long loops: training, evaluation, calibration, the benchmark grid.

A bar is for a person watching: it shows only when stderr is a terminal and ``DSPRUNE_PROGRESS``
is not ``0`` (``dsprune --quiet`` sets it to ``0``). CI logs, pipes and redirected runs get
nothing, not even a carriage return.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

# Seconds between redraws: a bar that redraws on every fast tick costs time of its own.
MIN_INTERVAL = 1.0


def progress_enabled() -> bool:
    """Whether bars show: stderr is a terminal and ``DSPRUNE_PROGRESS`` is not ``0``."""
    return os.environ.get("DSPRUNE_PROGRESS", "1") != "0" and sys.stderr.isatty()


def progress_bar(total: int | None, desc: str, *, enabled: bool | None = None):
    """A tqdm bar on stderr that disappears when done, or a silent one that prints nothing.

    Use it as a context manager (or call ``close()``); ``update(n)`` advances it.

    Args:
        total: ticks expected; None when unknown (the bar then counts without a percentage).
        desc: what the loop does, e.g. ``"finetune"`` or ``"calibrate pruned.onnx"``.
        enabled: force the bar on or off; None follows :func:`progress_enabled`.
    """
    from tqdm import tqdm

    if enabled is None:
        enabled = progress_enabled()
    return tqdm(total=total, desc=desc, disable=not enabled, mininterval=MIN_INTERVAL, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def track(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """Yield ``items`` unchanged, one bar tick each (see :func:`progress_bar`)."""
    with progress_bar(total, desc) as bar:
        for item in items:
            yield item
            bar.update(1)
