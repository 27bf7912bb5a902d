"""Latency budgets: the cost model of a pruned model's latency and the planner that picks K from it.

The user names a latency (or throughput) on a machine; dsprune measures a few pruned layouts of the
model there (:mod:`benchmarks.cost_table`), fits latency as a linear function of what was kept, and
plans the largest head budget K predicted to meet the target with a safety margin. DSP then trains
with exactly that K, and the bench stage checks the measured latency against the budget.

To first order the latency of a pruned model depends on how many heads it keeps and on how many of
its layers lost every head (a headless layer skips its attention altogether); the weights do not
matter. So a cost point is a layout (heads kept per layer) and its measured latency, and a fit is a
least-squares line over named features of the layout (``heads``, ``empty_layers``).

With ``budget.ffn`` the layouts also keep some feed-forward blocks per layer (``blocks``), the fit
gains a ``ffn_blocks`` term, and the plan is no longer a head count: the fitted milliseconds per
head and per block become the units' costs, and what the target leaves after the fixed part of the
latency becomes one cost budget (:func:`plan_units`). Joint DSP then decides which heads and blocks
fit in it, as it does with a FLOPs budget.

Everything here is pure Python and numpy: no torch, no timing, no run folder.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

TARGET_FIELDS = ("latency_ms", "latency_fraction", "throughput_per_s")
PERCENTILES = ("p50", "p90", "p99")
# Engines a budget can name: the bench stage's engine names (pipeline.stages.bench.variant_files).
ENGINES = ("torch-fp32", "onnx-fp32", "onnx-int8")
# The fits tried, simplest first. The per-empty-layer term is kept only where it predicts held-out
# points clearly better (see fit_cost_model).
FEATURE_SETS = (("intercept", "heads"), ("intercept", "heads", "empty_layers"))
# With feed-forward blocks planned too.
FFN_FEATURE_SETS = (("intercept", "heads", "ffn_blocks"), ("intercept", "heads", "ffn_blocks", "empty_layers"))
# A richer fit must cut the leave-one-out RMS relative error by this fraction to be chosen.
MIN_LOO_GAIN = 0.10
# ... and by at least this much absolutely (0.1% of the latency, well under timing noise).
MIN_LOO_GAIN_ABSOLUTE = 0.001
# Relative slack when comparing a prediction with a budget, so that equal counts as meeting it.
_EQUAL = 1e-9


class BudgetUnreachable(ValueError):
    """No allowed head budget is predicted to meet the target; one line naming the field and value."""


# --- layouts --------------------------------------------------------------------------------------


def spread_layout(keep: int, num_layers: int, heads_per_layer: int) -> tuple[int, ...]:
    """Heads kept per layer with ``keep`` heads spread as evenly as possible (earlier layers get the extra).

    This empties as few layers as ``keep`` allows: ``max(0, num_layers - keep)``.
    """
    _check_keep(keep, num_layers, heads_per_layer)
    base, extra = divmod(keep, num_layers)
    return tuple(base + (1 if layer < extra else 0) for layer in range(num_layers))


def concentrated_layout(keep: int, num_layers: int, heads_per_layer: int) -> tuple[int, ...]:
    """Heads kept per layer with ``keep`` heads packed into as few layers as possible (earlier layers first).

    This empties as many layers as ``keep`` allows: ``num_layers - ceil(keep / heads_per_layer)``.
    """
    _check_keep(keep, num_layers, heads_per_layer)
    full, rest = divmod(keep, heads_per_layer)
    return tuple(heads_per_layer if layer < full else (rest if layer == full else 0) for layer in range(num_layers))


def _check_keep(keep: int, num_layers: int, heads_per_layer: int) -> None:
    if not 0 <= keep <= num_layers * heads_per_layer:
        raise ValueError(f"keep {keep} outside 0..{num_layers * heads_per_layer} "
                         f"({num_layers} x {heads_per_layer} heads)")


def kept_heads_for_layout(layout: Sequence[int]) -> dict[int, list[int]]:
    """``{layer: [0 .. n-1]}`` for a per-layer head count; which heads does not change the latency."""
    return {layer: list(range(n)) for layer, n in enumerate(layout)}


def features(layout: Sequence[int], blocks: Sequence[int] | None = None) -> dict[str, float]:
    """The cost model's features of a layout: ``heads`` kept, ``empty_layers`` (layers with no head)
    and, when ``blocks`` (feed-forward blocks kept per layer) is given, ``ffn_blocks`` kept."""
    out = {"intercept": 1.0, "heads": float(sum(layout)), "empty_layers": float(sum(1 for n in layout if n == 0))}
    if blocks is not None:
        out["ffn_blocks"] = float(sum(blocks))
    return out


def point_features(point: dict) -> dict[str, float]:
    """:func:`features` of a cost point or layout item (``layout`` and, with feed-forward blocks, ``blocks``)."""
    return features(point["layout"], point.get("blocks"))


def default_grid(num_layers: int, heads_per_layer: int) -> tuple[int, ...]:
    """All heads, three quarters, half, a quarter and none: 72, 54, 36, 18, 0 for 6 x 12."""
    total = num_layers * heads_per_layer
    return tuple(sorted({round(total * q / 4) for q in range(4, -1, -1)}, reverse=True))


def cost_layouts(grid: Iterable[int], num_layers: int, heads_per_layer: int) -> list[dict]:
    """The layouts to time: each K of ``grid`` spread evenly, and packed into few layers where that empties more.

    The packed twins empty layers at the same K, so the fit can see what a headless layer saves
    (DSP's global budget leaves layers uneven, some empty).

    Returns:
        ``[{"name", "layout", "keep", "empty_layers"}]``, K descending, spread before packed.
    """
    out = []
    for keep in sorted(set(grid), reverse=True):
        spread = spread_layout(keep, num_layers, heads_per_layer)
        packed = concentrated_layout(keep, num_layers, heads_per_layer)
        for name, layout in (("spread", spread), ("packed", packed)):
            if name == "packed" and features(packed)["empty_layers"] == features(spread)["empty_layers"]:
                continue
            out.append({"name": f"k{keep}-{name}", "layout": list(layout), "keep": keep,
                        "empty_layers": int(features(layout)["empty_layers"])})
    return out


def default_block_grid(num_layers: int, blocks_per_layer: int) -> tuple[int, ...]:
    """Feed-forward blocks kept in the timed layouts: all, three quarters, half, a quarter and none."""
    return default_grid(num_layers, blocks_per_layer)


def ffn_cost_layouts(grid: Iterable[int], block_grid: Iterable[int], num_layers: int, heads_per_layer: int,
                     blocks_per_layer: int) -> list[dict]:
    """The layouts to time when feed-forward blocks are planned too.

    The head layouts of :func:`cost_layouts` with every block kept; every count of ``block_grid``
    spread over the layers with every head kept; and the two shrunk together (the i-th largest head
    count beside the i-th largest block count), so that the fit sees heads and blocks removed at once
    and the fastest layout the model has (nothing kept) is measured.

    Returns:
        Items as from :func:`cost_layouts`, each with ``blocks`` (kept per layer) and ``ffn_blocks``.
    """
    full = [blocks_per_layer] * num_layers
    heads = sorted(set(grid), reverse=True)
    blocks = sorted(set(block_grid), reverse=True)
    out = [{**item, "blocks": full, "ffn_blocks": sum(full)}
           for item in cost_layouts(heads, num_layers, heads_per_layer)]
    total_heads, total_blocks = num_layers * heads_per_layer, num_layers * blocks_per_layer
    for count in blocks:
        if count < total_blocks:
            out.append({"name": f"k{total_heads}-b{count}", "layout": [heads_per_layer] * num_layers,
                        "keep": total_heads, "empty_layers": 0,
                        "blocks": list(spread_layout(count, num_layers, blocks_per_layer)), "ffn_blocks": count})
    for keep, count in zip(heads, blocks):
        if keep < total_heads and count < total_blocks:
            layout = spread_layout(keep, num_layers, heads_per_layer)
            out.append({"name": f"k{keep}-b{count}", "layout": list(layout), "keep": keep,
                        "empty_layers": int(features(layout)["empty_layers"]),
                        "blocks": list(spread_layout(count, num_layers, blocks_per_layer)), "ffn_blocks": count})
    return out


def empty_layer_range(keep: int, num_layers: int, heads_per_layer: int, per_layer: bool = False) -> tuple[int, int]:
    """The fewest and most layers a mask of ``keep`` heads can leave empty.

    With ``per_layer`` every layer keeps ``keep / num_layers`` heads, so none is empty unless K is 0.
    """
    if per_layer:
        return (num_layers, num_layers) if keep == 0 else (0, 0)
    return max(0, num_layers - keep), num_layers - math.ceil(keep / heads_per_layer)


# --- the fit --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostFit:
    """Latency (ms) as ``sum(coefficient * feature)``, fitted by least squares on measured points.

    Attributes:
        terms: feature names, ``intercept`` first.
        coefficients: one per term, in ms per unit of the feature.
        max_rel_error, rms_rel_error: ``|predicted - measured| / measured`` over the fitted points.
        loo_rms_rel_error: the same, each point predicted by a fit without it (leave-one-out);
            None with too few points.
        points: how many points were fitted.
    """

    terms: tuple[str, ...]
    coefficients: tuple[float, ...]
    max_rel_error: float
    rms_rel_error: float
    loo_rms_rel_error: float | None
    points: int

    def predict(self, feature_values: dict[str, float]) -> float:
        return float(sum(c * feature_values[t] for t, c in zip(self.terms, self.coefficients)))

    def formula(self, unit: str = "ms") -> str:
        parts = [f"{self.coefficients[0]:.3f}"]
        for term, coefficient in zip(self.terms[1:], self.coefficients[1:]):
            parts.append(f"{'-' if coefficient < 0 else '+'} {abs(coefficient):.4f} x {term.replace('_', ' ')}")
        return f"{' '.join(parts)} {unit}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["terms"] = list(self.terms)
        data["coefficients"] = dict(zip(self.terms, self.coefficients))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CostFit":
        terms = tuple(data["terms"])
        return cls(terms=terms, coefficients=tuple(float(data["coefficients"][t]) for t in terms),
                   max_rel_error=data["max_rel_error"], rms_rel_error=data["rms_rel_error"],
                   loo_rms_rel_error=data["loo_rms_rel_error"], points=data["points"])


def _solve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coefficients


def fit_linear(points: Sequence[dict], terms: Sequence[str], value_key: str) -> CostFit:
    """Least-squares fit of ``point[value_key]`` on ``point_features(point)[terms]``.

    Args:
        points: cost points, each with a ``layout`` (heads per layer), ``blocks`` where the terms
            include ``ffn_blocks``, and the measured value.
        terms: feature names, e.g. ``("intercept", "heads")``.
        value_key: the measured statistic, e.g. ``"p50_ms"``.

    Raises:
        ValueError: fewer points than terms, or features that cannot separate the terms.
    """
    terms = tuple(terms)
    x = np.array([[point_features(p)[t] for t in terms] for p in points], dtype=float)
    y = np.array([float(p[value_key]) for p in points])
    if len(points) < len(terms) or np.linalg.matrix_rank(x) < len(terms):
        raise ValueError(f"cost points cannot determine a fit on {', '.join(terms)}: "
                         f"{len(points)} points, features of rank {np.linalg.matrix_rank(x) if len(points) else 0}")
    coefficients = _solve(x, y)
    relative = np.abs(x @ coefficients - y) / y
    loo = None
    if len(points) > len(terms):
        held_out = []
        for i in range(len(points)):
            keep = np.arange(len(points)) != i
            if np.linalg.matrix_rank(x[keep]) < len(terms):
                break
            held_out.append(abs(float(x[i] @ _solve(x[keep], y[keep])) - y[i]) / y[i])
        else:
            loo = float(np.sqrt(np.mean(np.square(held_out))))
    return CostFit(terms=terms, coefficients=tuple(float(c) for c in coefficients),
                   max_rel_error=float(relative.max()), rms_rel_error=float(np.sqrt(np.mean(np.square(relative)))),
                   loo_rms_rel_error=loo, points=len(points))


def fit_cost_model(points: Sequence[dict], value_key: str,
                   feature_sets: Sequence[Sequence[str]] = FEATURE_SETS) -> tuple[CostFit, list[CostFit], str]:
    """Fit every feature set of ``feature_sets`` (:data:`FEATURE_SETS`, or :data:`FFN_FEATURE_SETS`) and choose one.

    The per-empty-layer term is taken only when the points vary it independently of the head count
    and it cuts the leave-one-out RMS relative error by at least :data:`MIN_LOO_GAIN` of itself and
    :data:`MIN_LOO_GAIN_ABSOLUTE`; in-sample error always falls with more terms, so it cannot decide.

    Returns:
        (the chosen fit, every fit that could be made, why the chosen one).
    """
    fits = []
    for terms in feature_sets:
        try:
            fits.append(fit_linear(points, terms, value_key))
        except ValueError:
            continue
    if not fits:
        raise ValueError(f"cost table: {len(points)} points cannot determine latency against kept heads")
    base_name = "heads alone" if fits[0].terms == ("intercept", "heads") else "heads and blocks alone"
    chosen, reason = fits[0], base_name
    for fit in fits[1:]:
        base = chosen.loo_rms_rel_error
        if base is None or fit.loo_rms_rel_error is None:
            continue
        gain = base - fit.loo_rms_rel_error
        if gain > MIN_LOO_GAIN * base and gain > MIN_LOO_GAIN_ABSOLUTE:
            reason = (f"{fit.terms[-1].replace('_', ' ')} term cut the leave-one-out error from "
                      f"{base:.1%} to {fit.loo_rms_rel_error:.1%}")
            chosen = fit
        else:
            reason = (f"{base_name}: the {fit.terms[-1].replace('_', ' ')} term left the leave-one-out error at "
                      f"{fit.loo_rms_rel_error:.1%} against {base:.1%}")
    return chosen, fits, reason


# --- targets and the planner ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the planner must keep the predicted per-call latency under.

    Attributes:
        field: the budget field the user set (one of :data:`TARGET_FIELDS`).
        value: its value (ms, a fraction of the unpruned latency, or sequences/s).
        statistic: the measured statistic the budget is about: ``p50_ms``/``p90_ms``/``p99_ms``, or
            ``mean_ms`` for throughput (sequences/s = batch * 1000 / mean per-call ms).
        latency_ms: the per-call latency bound on ``statistic`` that ``value`` amounts to.
        batch: sequences per call.
    """

    field: str
    value: float
    statistic: str
    latency_ms: float
    batch: int

    def describe(self) -> str:
        if self.field == "throughput_per_s":
            return f"throughput >= {self.value:g} sequences/s (mean <= {self.latency_ms:.3f} ms per call)"
        name = self.statistic.removesuffix("_ms")
        if self.field == "latency_fraction":
            return f"{name} <= {self.value:g} x unpruned = {self.latency_ms:.3f} ms"
        return f"{name} <= {self.value:g} ms"


def resolve_target(field_name: str, value: float, *, percentile: str, batch: int,
                   unpruned_ms: dict[str, float] | None = None) -> Target:
    """Turn a budget field into a latency bound on one measured statistic.

    Args:
        field_name: ``latency_ms``, ``latency_fraction`` or ``throughput_per_s``.
        value: the field's value.
        percentile: ``p50``, ``p90`` or ``p99`` (latency budgets).
        batch: sequences per call.
        unpruned_ms: measured statistics of the unpruned model (``{"p50_ms": ...}``); needed by
            ``latency_fraction``.
    """
    if field_name not in TARGET_FIELDS:
        raise ValueError(f"budget field {field_name!r}; valid: {', '.join(TARGET_FIELDS)}")
    if field_name == "throughput_per_s":
        return Target(field_name, value, "mean_ms", batch * 1000.0 / value, batch)
    statistic = f"{percentile}_ms"
    if field_name == "latency_fraction":
        if not unpruned_ms or statistic not in unpruned_ms:
            raise ValueError("budget.latency_fraction needs the unpruned model's measured latency")
        return Target(field_name, value, statistic, value * unpruned_ms[statistic], batch)
    return Target(field_name, value, statistic, value, batch)


# A round is paired only when both of its timings came within this of their fastest round.
PAIR_TOLERANCE = 0.2


def paired_fraction(values_ms: Sequence[float], baseline_ms: Sequence[float]) -> float | None:
    """The median over rounds of ``value / baseline``, each pair timed in the same round; None without pairs.

    Every timing round runs every layout once, back to back, so a drift of the machine between rounds
    (the same files measured 2.5% apart 45 minutes later here, even at one thread) scales both
    members of a pair and cancels in their ratio. The ratio of two independent best rounds does not
    cancel it: it can pair a quiet round of one with a slow round of the other.

    Rounds where either timing ran more than :data:`PAIR_TOLERANCE` over its fastest are left out:
    the 2-core VM here has a slow mode (whole processes 1.5-1.7x slower at two threads) that is not
    a scaling. It added about the same milliseconds to a large and a small model (a pruned model's
    ratio rose from 0.52 to 0.63 in such rounds), so it does not cancel in a ratio.
    """
    if not values_ms or len(values_ms) != len(baseline_ms):
        return None
    fast_value, fast_baseline = min(values_ms), min(baseline_ms)
    pairs = [v / b for v, b in zip(values_ms, baseline_ms)
             if v <= fast_value * (1 + PAIR_TOLERANCE) and b <= fast_baseline * (1 + PAIR_TOLERANCE)]
    return float(np.median(pairs)) if pairs else None


def paired_points(points: Sequence[dict], unpruned: dict) -> list[dict] | None:
    """Cost points for a ``latency_fraction`` budget on p50: each point's p50 replaced by its paired
    fraction of the unpruned layout (:func:`paired_fraction`) times the unpruned p50, the anchor of the
    target, so the fit and the plan work in fractions of the unpruned model timed beside each layout.
    The point's own p50 stays as ``best_p50_ms``. None when the rounds cannot be paired."""
    out = []
    for point in points:
        fraction = paired_fraction(point.get("rounds_p50_ms", []), unpruned.get("rounds_p50_ms", []))
        if fraction is None:
            return None
        out.append({**point, "best_p50_ms": point["p50_ms"], "paired_fraction": fraction,
                    "p50_ms": fraction * unpruned["p50_ms"]})
    return out


def allowed_keeps(num_layers: int, heads_per_layer: int, per_layer: bool = False) -> list[int]:
    """Head budgets the methods accept, largest first: 1..N, or multiples of the layer count with per_layer."""
    total = num_layers * heads_per_layer
    step = num_layers if per_layer else 1
    return list(range(total - total % step, 0, -step))


def predict_keep(fit: CostFit, keep: int, num_layers: int, heads_per_layer: int,
                 per_layer: bool = False) -> tuple[float, float]:
    """(best, worst) predicted latency of any mask of ``keep`` heads.

    The number of emptied layers of a trained mask is not known before training; the prediction
    ranges over every count the mask could have, and the planner takes the worst.
    """
    low, high = empty_layer_range(keep, num_layers, heads_per_layer, per_layer)
    values = [fit.predict({"intercept": 1.0, "heads": float(keep), "empty_layers": float(e)}) for e in (low, high)]
    return min(values), max(values)


@dataclass(frozen=True)
class Plan:
    """The planner's answer.

    Attributes:
        keep: the planned K (None when no allowed K is predicted to meet the target).
        predicted_ms: worst-case predicted latency at ``keep``.
        smallest_keep, smallest_ms: the fewest heads allowed and its worst-case prediction (the
            fastest a trained mask is predicted to get).
        curve: ``[{"keep", "predicted_ms", "best_ms"}]`` for every allowed K, largest first.
    """

    keep: int | None
    predicted_ms: float | None
    smallest_keep: int
    smallest_ms: float
    curve: list[dict] = field(default_factory=list)

    @property
    def reachable(self) -> bool:
        return self.keep is not None


def meets(predicted_ms: float, target: Target, margin: float) -> bool:
    """Whether ``predicted_ms``, grown by the safety margin, stays within the target (equal meets)."""
    return predicted_ms * (1.0 + margin) <= target.latency_ms * (1.0 + _EQUAL)


def plan_heads(fit: CostFit, target: Target, *, num_layers: int, heads_per_layer: int, margin: float,
               per_layer: bool = False) -> Plan:
    """The largest allowed K whose worst-case predicted latency times ``1 + margin`` meets the target.

    Every allowed K is checked (not only up to the first miss), so a fit that is not monotone in K
    still gives the largest K that meets.
    """
    curve = []
    for keep in allowed_keeps(num_layers, heads_per_layer, per_layer):
        best, worst = predict_keep(fit, keep, num_layers, heads_per_layer, per_layer)
        curve.append({"keep": keep, "predicted_ms": worst, "best_ms": best})
    chosen = next((p for p in curve if meets(p["predicted_ms"], target, margin)), None)
    smallest = curve[-1]
    return Plan(keep=chosen["keep"] if chosen else None, predicted_ms=chosen["predicted_ms"] if chosen else None,
                smallest_keep=smallest["keep"], smallest_ms=smallest["predicted_ms"], curve=curve)


@dataclass(frozen=True)
class UnitPlan:
    """The planner's answer when heads and feed-forward blocks share the budget.

    The fit is ``fixed + head_ms x heads + block_ms x blocks`` (its empty-layers term, if any, taken
    at its worst). A mask meets the target with the margin when its heads and blocks cost at most
    ``budget_ms``, which is what joint DSP then trains with (unit costs ``head_ms`` and ``block_ms``).

    Attributes:
        head_ms, block_ms: fitted milliseconds one head and one block add.
        fixed_ms: the fitted latency with nothing kept (the worst case over emptied layers).
        budget_ms: what the kept heads and blocks may cost (at most all of them); None when unreachable.
        predicted_ms: ``fixed_ms + budget_ms``: the worst case of any mask within the budget.
        all_ms: the fitted latency of the unpruned model.
        smallest_ms: the fitted latency of one unit, the cheaper kind, kept (the fastest a mask gets).
        heads_total, blocks_total: how many of each the model has.
        free: the kinds whose fitted cost was not positive (a table that does not show what removing
            one saves): they cost nothing against the budget.
        correction: measured over fitted latency of the mixes timed at a first plan's budget
            (:func:`boundary_mixes`); the budget is planned for ``correction x`` the fit. 1.0 uncorrected.
    """

    head_ms: float
    block_ms: float
    fixed_ms: float
    budget_ms: float | None
    predicted_ms: float | None
    all_ms: float
    smallest_ms: float
    heads_total: int
    blocks_total: int
    free: tuple[str, ...] = ()
    correction: float = 1.0

    @property
    def reachable(self) -> bool:
        return self.budget_ms is not None

    def heads_with_all_blocks(self) -> int:
        """Heads that fit beside every block (0 when the blocks alone overrun the budget)."""
        return _units_within(self.budget_ms - self.blocks_total * self.block_ms, self.head_ms, self.heads_total)

    def blocks_with_all_heads(self) -> int:
        """Blocks that fit beside every head."""
        return _units_within(self.budget_ms - self.heads_total * self.head_ms, self.block_ms, self.blocks_total)


def _units_within(budget_ms: float, unit_ms: float, total: int) -> int:
    if budget_ms < 0:
        return 0
    return total if unit_ms <= 0 else max(0, min(total, math.floor(budget_ms / unit_ms * (1 + _EQUAL))))


def plan_units(fit: CostFit, target: Target, *, num_layers: int, heads_per_layer: int, blocks_per_layer: int,
               margin: float, correction: float = 1.0) -> UnitPlan:
    """The largest cost budget of heads and feed-forward blocks whose prediction times ``1 + margin`` meets the target.

    A kind whose fitted cost is not positive is planned at no cost (:attr:`UnitPlan.free`). With a
    ``correction`` (measured over fitted latency near the budget, :func:`boundary_mixes`), the
    prediction ``correction x (fixed + kept units)`` times ``1 + margin`` must meet the target.

    Raises:
        ValueError: the fit has no ``ffn_blocks`` term.
    """
    if "ffn_blocks" not in fit.terms:
        raise ValueError(f"cost model: fit on {', '.join(fit.terms)} has no ffn_blocks term to plan blocks with")
    coefficients = dict(zip(fit.terms, fit.coefficients))
    fitted = {"heads": coefficients["heads"], "ffn_blocks": coefficients["ffn_blocks"]}
    free = tuple(kind for kind, value in fitted.items() if value <= 0)
    head_ms, block_ms = (max(0.0, value) for value in fitted.values())
    # An empty layer that (oddly) costs time is charged as if every layer were empty; one that saves is ignored.
    fixed_ms = coefficients["intercept"] + max(0.0, coefficients.get("empty_layers", 0.0)) * num_layers
    heads_total, blocks_total = num_layers * heads_per_layer, num_layers * blocks_per_layer
    everything = heads_total * head_ms + blocks_total * block_ms
    allowed = target.latency_ms * (1 + _EQUAL) / (1.0 + margin) / correction - fixed_ms
    budget_ms = min(allowed, everything) if allowed >= min(head_ms, block_ms) else None
    return UnitPlan(head_ms=head_ms, block_ms=block_ms, fixed_ms=fixed_ms, budget_ms=budget_ms,
                    predicted_ms=None if budget_ms is None else correction * (fixed_ms + budget_ms),
                    all_ms=fixed_ms + everything, smallest_ms=correction * (fixed_ms + min(head_ms, block_ms)),
                    heads_total=heads_total, blocks_total=blocks_total, free=free, correction=correction)


# Shares of a unit budget spent on heads in the mixes a plan times before it trusts its fit.
BOUNDARY_HEAD_SHARES = (0.75, 0.5, 0.25)


def boundary_mixes(plan: UnitPlan, num_layers: int, heads_per_layer: int, blocks_per_layer: int,
                   shares: Sequence[float] = BOUNDARY_HEAD_SHARES) -> list[dict]:
    """Layouts that spend the plan's budget with different mixes: ``share`` of it on heads, the rest on blocks.

    A latency fit over heads and blocks was least accurate where both are cut (on MiniLM, int8 at
    batch 1, it missed by up to 9% there against 2% with either kind alone): these are what a
    trained mask may look like, and timing them tells the plan how far to trust the fit there.
    Heads and blocks are spread over the layers, emptying none (the slowest spread). Duplicates are dropped.

    Returns:
        Items as from :func:`ffn_cost_layouts`, named ``near-k{heads}-b{blocks}``.
    """
    out, seen = [], set()
    for share in shares:
        heads = _units_within(share * plan.budget_ms, plan.head_ms, plan.heads_total)
        blocks = _units_within(plan.budget_ms - heads * plan.head_ms, plan.block_ms, plan.blocks_total)
        if (heads, blocks) in seen:
            continue
        seen.add((heads, blocks))
        layout = spread_layout(heads, num_layers, heads_per_layer)
        out.append({"name": f"near-k{heads}-b{blocks}", "layout": list(layout), "keep": heads,
                    "empty_layers": int(features(layout)["empty_layers"]),
                    "blocks": list(spread_layout(blocks, num_layers, blocks_per_layer)), "ffn_blocks": blocks})
    return out


def boundary_correction(fit: CostFit, points: Sequence[dict], value_key: str) -> float:
    """The largest measured over fitted latency among the mixes at the budget: the factor the plan applies."""
    return max(float(p[value_key]) / fit.predict(point_features(p)) for p in points)


def unreachable_units_message(target: Target, plan: UnitPlan, margin: float, *, fastest_measured_ms: float | None,
                              setting: str) -> str:
    """One line for a budget that not even one head or block kept is predicted to meet."""
    if target.field == "throughput_per_s":
        asked = f"budget.throughput_per_s: {target.value:g} sequences/s (mean <= {target.latency_ms:.3f} ms per call)"
    else:
        unit = f"{target.value:g}" + (" of the unpruned latency" if target.field == "latency_fraction" else " ms")
        asked = f"budget.{target.field}: {unit} ({target.statistic.removesuffix('_ms')} <= {target.latency_ms:.3f} ms)"
    line = (f"{asked} is out of reach on this machine: one head or feed-forward block kept is predicted at "
            f"{plan.smallest_ms:.3f} ms ({plan.smallest_ms * (1 + margin):.3f} ms with the {margin:.0%} margin)")
    if fastest_measured_ms:
        line += f"; with every head and block removed it measured {fastest_measured_ms:.3f} ms"
    return f"{line} ({setting})"


def unreachable_message(target: Target, plan: Plan, margin: float, *, fastest_measured_ms: float | None,
                        setting: str) -> str:
    """One line for a budget no allowed K meets: the field, its value, and the fastest the model gets."""
    if target.field == "throughput_per_s":
        best = target.batch * 1000.0 / plan.smallest_ms
        line = (f"budget.throughput_per_s: {target.value:g} sequences/s is out of reach on this machine: "
                f"{plan.smallest_keep} head(s) are predicted at {best:.1f}/s ({best / (1 + margin):.1f}/s "
                f"with the {margin:.0%} margin)")
        if fastest_measured_ms:
            line += f"; with every head removed it measured {target.batch * 1000.0 / fastest_measured_ms:.1f}/s"
    else:
        unit = f"{target.value:g}" + (" of the unpruned latency" if target.field == "latency_fraction" else " ms")
        line = (f"budget.{target.field}: {unit} ({target.statistic.removesuffix('_ms')} <= {target.latency_ms:.3f} ms) "
                f"is out of reach on this machine: {plan.smallest_keep} head(s) are predicted at "
                f"{plan.smallest_ms:.3f} ms ({plan.smallest_ms * (1 + margin):.3f} ms with the {margin:.0%} margin)")
        if fastest_measured_ms:
            line += f"; with every head removed it measured {fastest_measured_ms:.3f} ms"
    return f"{line} ({setting})"


def measurement_warnings(points: Sequence[dict], *, cores: int, threads: int, fit: CostFit, margin: float) -> list[str]:
    """Reasons not to trust a cost table: a busy machine, unstable rounds, or a fit whose RMS error exceeds the margin.

    The busy and unstable thresholds are the report's (:data:`benchmarks.report.BUSY_LOAD_FRACTION`,
    :data:`benchmarks.report.MAX_SPREAD`); the timing's own threads do not count as load.
    """
    from benchmarks.report import BUSY_LOAD_FRACTION, MAX_SPREAD, unsettled_rounds
    from benchmarks.timing import CONFIRM_TOLERANCE

    warnings = []
    busiest = max(p["load_avg"][0] for p in points)
    if busiest - threads > BUSY_LOAD_FRACTION * cores:
        warnings.append(f"the machine was busy while the cost table was timed (1-minute load up to {busiest:.2f} on "
                        f"{cores} cores, {threads} of it the timing's): measure again on a quiet machine "
                        "(dsprune plan --force)")
    unsettled = [p for p in points if unsettled_rounds(p)]
    unconfirmed = [p for p in unsettled if p.get("aggregate") == "best"]
    unstable = [p for p in unsettled if p.get("aggregate") != "best"]
    if unconfirmed:
        warnings.append(f"{len(unconfirmed)} of {len(points)} layouts had no second round within "
                        f"{CONFIRM_TOLERANCE:.0%} of their fastest (spread up to "
                        f"{max(p['spread'] for p in unconfirmed):.2f}x)")
    if unstable:
        warnings.append(f"{len(unstable)} of {len(points)} layouts varied over {MAX_SPREAD:g}x between rounds "
                        f"(up to {max(p['spread'] for p in unstable):.2f}x)")
    # The typical error, not the worst: the worst point is often K = 0, which no plan can choose.
    if fit.rms_rel_error > margin:
        warnings.append(f"the fit misses the measured points by {fit.rms_rel_error:.1%} RMS (up to "
                        f"{fit.max_rel_error:.1%}), more than the {margin:.0%} margin")
    return warnings


# --- what the study says about a K ----------------------------------------------------------------


def study_variant(method: str, mode: str) -> str:
    """The study's variant name for a pipeline method: ``method:mode`` for trained methods, else the method."""
    return f"{method}:{mode}" if method in ("dsp", "ste", "hardconcrete") else method


def expected_metric(rows: Sequence[dict], *, variant: str, task: str, keep: int) -> dict | None:
    """The study's metric range around ``keep`` heads for one variant and task.

    Takes the rows at the nearest studied K at or below ``keep`` and at or above it (one K when the
    study has ``keep`` itself), so the range brackets the planned K.

    Args:
        rows: study rows (``kind: row``) with ``variant``, ``task``, ``keep``, ``metric``, ``value``.

    Returns:
        ``{"variant", "metric", "keeps", "n", "mean", "min", "max"}``, or None without matching rows.
    """
    matching = [r for r in rows if r.get("kind", "row") == "row" and r.get("variant") == variant
                and r.get("task") == task and isinstance(r.get("value"), (int, float))]
    if not matching:
        return None
    studied = sorted({int(r["keep"]) for r in matching})
    below = [k for k in studied if k <= keep]
    above = [k for k in studied if k >= keep]
    keeps = sorted({*(below[-1:]), *(above[:1])})
    values = [float(r["value"]) for r in matching if int(r["keep"]) in keeps]
    return {"variant": variant, "metric": matching[0].get("metric", "metric"), "keeps": keeps, "n": len(values),
            "mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def read_study_rows(path: str | Path) -> list[dict]:
    """Rows of a study result: a merged ``study-*.json`` (its ``rows``) or a ``rows-*.jsonl`` file."""
    import json

    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return list(data["rows"]) if isinstance(data, dict) else list(data)
