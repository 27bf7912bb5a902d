"""The deployment report: report.json (schema ``dsprune.report/1``), report.md, PNG plots, compare.

``report.json`` is the machine-readable record (documented in ``docs/report-schema.md``); report.md
and the plots are built from it alone, for people. Matplotlib is imported inside the plotting
functions so that importing this module stays cheap.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from benchmarks.timing import CONFIRM_TOLERANCE

SCHEMA = "dsprune.report/1"
REFERENCE = "baseline/torch-fp32"
STAGES = ("fine-tuned", "hardened", "pruned", "onnx", "int8")
PLOT_FILES = {
    "latency": "latency.png",
    "head_mask": "head_mask.png",
    "accuracy_latency": "accuracy_latency.png",
}
# A busy machine or unstable rounds inflated timings 2-3x here; these bounds flag such rows.
# The benchmark's own threads load the machine; only load beyond them means other work competed.
BUSY_LOAD_FRACTION = 0.25
MAX_SPREAD = 1.2
# A pruning speedup below this share of its FLOP ideal gets a sentence on what the rows say ate the rest.
EFFICIENCY_FLOOR = 0.9
_DPI = 120


# --- validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ListOf:
    item: object
    length: int | None = None


@dataclass(frozen=True)
class _MapOf:
    """An object with free (string) keys, all holding values of one type."""

    value: object


@dataclass(frozen=True)
class _OneOf:
    values: tuple


@dataclass(frozen=True)
class _Nullable:
    inner: object


_LATENCY = {
    "batch": int, "seq": int, "threads": int,
    "p50_ms": float, "p90_ms": float, "p99_ms": float, "throughput_per_s": float,
    "spread": float, "load_avg": _ListOf(float, 3),
}
_REPORT = {
    "schema": str,
    "model": {
        "name": str, "heads_total": int, "heads_kept": int, "kept_heads": _MapOf(_ListOf(int)),
        "num_layers": int, "heads_per_layer": int,
    },
    "task": {"name": str, "metric": str, "eval_examples": int},
    "stages": _ListOf({"stage": _OneOf(STAGES), "variant": _Nullable(str), "metric": float, "drop": float}),
    "variants": _ListOf({
        "name": str, "pruned": bool, "engine": _OneOf(("torch", "onnxruntime")), "precision": str,
        "device": _OneOf(("cpu", "cuda")), "metric": float, "params": int, "flops_per_token": int,
        "file_bytes": _Nullable(int), "latency": _ListOf(_LATENCY),
    }),
    "speedups": _ListOf({"variant": str, "reference": str, "batch": int, "seq": int, "p50_ratio": float}),
    "gates": _ListOf({"name": str, "value": float, "bound": float, "passed": bool}),
    "machine": {"cpu": str, "cores": int, "load_avg": _ListOf(float, 3), "platform": str, "python": str},
    "versions": {"torch": str, "transformers": str, "onnxruntime": str, "onnx": str, "dsprune": str},
    "created": str,
    "seed": int,
}
# Optional: present when the run had a latency budget (added in place; the version is unchanged).
_GATE = {"name": str, "value": float, "bound": float, "passed": bool}
_BUDGET = {
    "target": {
        "field": _OneOf(("latency_ms", "latency_fraction", "throughput_per_s")), "value": float,
        "statistic": _OneOf(("p50_ms", "p90_ms", "p99_ms", "mean_ms")), "latency_ms": float, "engine": str,
        "device": _OneOf(("cpu", "cuda")), "batch": int, "seq": int, "threads": int, "margin": float,
    },
    "cost_model": {
        "points": _ListOf({"keep": int, "empty_layers": int, "kept_per_layer": _ListOf(int), "value_ms": float,
                           "fitted_ms": float, "spread": float, "load_avg": _ListOf(float, 3)}),
        "fit": {"terms": _ListOf(str), "coefficients": _MapOf(float), "max_rel_error": float,
                "rms_rel_error": float, "loo_rms_rel_error": _Nullable(float), "points": int},
        "fit_choice": str,
        "measured": str,
        "machine": {"cores": int, "load_avg": _ListOf(float, 3)},
    },
    "planned_keep": _Nullable(int),  # None when heads and blocks share the budget (then "units" is there)
    "predicted_ms": float,
    "curve": _ListOf({"keep": int, "predicted_ms": float, "best_ms": float}),
    "measured": {"keep": int, "empty_layers": int, "kept_per_layer": _ListOf(int), "value_ms": float,
                 "predicted_ms": float, "baseline_ms": float, "throughput_per_s": float, "spread": float,
                 "load_avg": _ListOf(float, 3)},
    "gate": _GATE,
}
BUDGET_PLOT = "budget.png"


def _fail(path: str, problem: str) -> None:
    raise ValueError(f"report.json: field '{path}' {problem}")


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check(value, spec, path: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            _fail(path, f"must be an object, got {_shown(value)}")
        for key, sub_spec in spec.items():
            sub_path = f"{path}.{key}" if path else key
            if key not in value:
                _fail(sub_path, "is missing")
            _check(value[key], sub_spec, sub_path)
    elif isinstance(spec, _ListOf):
        if not isinstance(value, list):
            _fail(path, f"must be a list, got {_shown(value)}")
        if spec.length is not None and len(value) != spec.length:
            _fail(path, f"must hold {spec.length} items, got {len(value)}")
        for i, item in enumerate(value):
            _check(item, spec.item, f"{path}[{i}]")
    elif isinstance(spec, _MapOf):
        if not isinstance(value, dict):
            _fail(path, f"must be an object, got {_shown(value)}")
        for key, item in value.items():
            _check(item, spec.value, f"{path}.{key}")
    elif isinstance(spec, _OneOf):
        if value not in spec.values:
            _fail(path, f"must be one of {', '.join(map(repr, spec.values))}, got {_shown(value)}")
    elif isinstance(spec, _Nullable):
        if value is not None:
            _check(value, spec.inner, path)
    elif spec is float:
        # bool is an int subclass; JSON writes whole floats such as a bound of 1 as ints.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {_shown(value)}")
    elif spec is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {_shown(value)}")
    elif not isinstance(value, spec):
        _fail(path, f"must be a {'string' if spec is str else spec.__name__}, got {_shown(value)}")


def validate_report(report: dict) -> None:
    """Check that a report has every field of schema ``dsprune.report/1`` with the right type.

    Extra fields are allowed (later versions add fields without renaming the schema).

    Args:
        report: the report as loaded from JSON.

    Raises:
        ValueError: one line naming the first bad field by its dotted path, e.g.
            ``report.json: field 'variants[2].latency[0].p50_ms' is missing``.
    """
    _check(report, _REPORT, "")
    if "budget" in report:
        _check(report["budget"], _BUDGET, "budget")
        fit = report["budget"]["cost_model"]["fit"]
        missing = [t for t in fit["terms"] if t not in fit["coefficients"]]
        if missing:
            _fail("budget.cost_model.fit.coefficients", f"lacks the terms {missing}")
    if report["schema"] != SCHEMA:
        _fail("schema", f"is {report['schema']!r}; this dsprune reads {SCHEMA!r}")
    try:
        datetime.fromisoformat(report["created"].replace("Z", "+00:00"))
    except ValueError:
        _fail("created", f"must be an ISO 8601 time, got {_shown(report['created'])}")
    model = report["model"]
    kept = 0
    for layer, heads in model["kept_heads"].items():
        if not layer.isdigit() or int(layer) >= model["num_layers"]:
            _fail(f"model.kept_heads.{layer}", f"must name a layer 0..{model['num_layers'] - 1}")
        for i, head in enumerate(heads):
            if not 0 <= head < model["heads_per_layer"]:
                _fail(f"model.kept_heads.{layer}[{i}]", f"must be a head 0..{model['heads_per_layer'] - 1}, got {head}")
        kept += len(heads)
    if kept != model["heads_kept"]:
        _fail("model.heads_kept", f"is {model['heads_kept']} but model.kept_heads lists {kept} heads")


# --- derived numbers --------------------------------------------------------------------------


def speedups(report: dict, reference: str = REFERENCE) -> list[dict]:
    """Median-latency ratios of every variant against a reference variant.

    Rows are matched on (batch, seq); a report is expected to hold one thread count.

    Args:
        report: a report with ``variants``.
        reference: the variant every other one is compared with.

    Returns:
        One ``{"variant", "reference", "batch", "seq", "p50_ratio"}`` per variant other than the
        reference and per (batch, seq) timed for both, ``p50_ratio = reference p50 / variant p50``
        (above 1 means faster than the reference). Empty when the reference is absent.
    """
    by_name = {v["name"]: v for v in report["variants"]}
    if reference not in by_name:
        return []
    reference_p50 = {(r["batch"], r["seq"]): r["p50_ms"] for r in by_name[reference]["latency"]}
    out = []
    for variant in report["variants"]:
        if variant["name"] == reference:
            continue
        for row in sorted(variant["latency"], key=lambda r: (r["batch"], r["seq"])):
            key = (row["batch"], row["seq"])
            if key in reference_p50:
                out.append({"variant": variant["name"], "reference": reference, "batch": key[0], "seq": key[1],
                            "p50_ratio": reference_p50[key] / row["p50_ms"]})
    return out


def head_mask(report: dict) -> list[list[int]]:
    """The kept-head mask, ``mask[layer][head]`` 1 for kept and 0 for pruned."""
    model = report["model"]
    mask = [[0] * model["heads_per_layer"] for _ in range(model["num_layers"])]
    for layer, heads in model["kept_heads"].items():
        for head in heads:
            mask[int(layer)][head] = 1
    return mask


def _batch1_points(report: dict) -> tuple[int | None, list[tuple[dict, dict]]]:
    """(seq, [(variant, latency row)]) at batch 1 and the shortest sequence timed at batch 1."""
    rows = [(v, r) for v in report["variants"] for r in v["latency"] if r["batch"] == 1]
    if not rows:
        return None, []
    seq = min(r["seq"] for _, r in rows)
    return seq, [(v, r) for v, r in rows if r["seq"] == seq]


def unsettled_rounds(row: dict) -> str | None:
    """Why a timed row's rounds do not settle its value, or None: a fastest-round row
    (``aggregate: best``) whose fastest round no second round came near, or a median over rounds
    spread above ``MAX_SPREAD``. The plan stage judges its cost table with the same rule."""
    if row.get("aggregate") == "best" and row.get("rounds", 1) > 1:
        return f"best round unconfirmed, spread {row['spread']:.2f}" if row["confirmed_rounds"] < 2 else None
    return f"spread {row['spread']:.2f}" if row["spread"] > MAX_SPREAD else None


def _noise(row: dict, cores: int) -> list[str]:
    """Why a latency row may be noisy (a busy machine, unstable rounds); empty when it looks clean."""
    reasons = []
    if row["load_avg"][0] - row["threads"] > BUSY_LOAD_FRACTION * cores:
        reasons.append(f"load {row['load_avg'][0]:.2f} on {cores} cores, {row['threads']} of it the benchmark's")
    unsettled = unsettled_rounds(row)
    if unsettled:
        reasons.append(unsettled)
    return reasons


def _noisy_rows(report: dict) -> list[str]:
    cores = report["machine"]["cores"]
    noisy = []
    for variant in report["variants"]:
        for row in variant["latency"]:
            reasons = _noise(row, cores)
            if reasons:
                noisy.append(f"{variant['name']} batch {row['batch']} ({', '.join(reasons)})")
    return noisy


def _fixed_cost(rows: dict[int, float], low: int, high: int) -> tuple[float, float]:
    """(fixed ms per call, ms per sequence) of ``p50 = fixed + batch x per-sequence`` through two batch sizes."""
    per_sequence = (rows[high] - rows[low]) / (high - low)
    return rows[low] - low * per_sequence, per_sequence


def _shortfall(report: dict, entry: dict) -> str:
    """What the rows say about a pruning speedup below ``EFFICIENCY_FLOOR`` of its FLOP ideal.

    Two causes the rows can show: noisy timings, and a fixed cost per call (framework overhead,
    thread wake-ups, the classifier) that removing heads does not shrink. The fixed cost comes from
    the two smallest batch sizes timed at this sequence length, fitting ``p50 = fixed + batch x
    per-sequence`` to each model; it needs two batch sizes and a per-sequence time that falls
    with the batch.
    """
    kind = entry["variant"].split("/", 1)[1]
    by_name = {v["name"]: v for v in report["variants"]}
    models = {"baseline": by_name[f"baseline/{kind}"], "pruned": by_name[entry["variant"]]}
    p50 = {m: {r["batch"]: r["p50_ms"] for r in v["latency"] if r["seq"] == entry["seq"]} for m, v in models.items()}
    batch, seq, ideal = entry["batch"], entry["seq"], entry["ideal"]
    text = (f"**{entry['variant']}**, batch {batch}, seq {seq}: {entry['measured']:.2f}x against an ideal "
            f"{ideal:.2f}x (efficiency {entry['efficiency']:.2f}).")
    cores = report["machine"]["cores"]
    noisy = [f"{m} {', '.join(_noise(r, cores))}" for m, v in models.items() for r in v["latency"]
             if (r["batch"], r["seq"]) == (batch, seq) and _noise(r, cores)]
    if noisy:
        text += f" Its timings are noisy ({'; '.join(noisy)}): rerun on a quiet machine before reading this ratio."
    batches = sorted(set(p50["baseline"]) & set(p50["pruned"]))
    if len(batches) < 2:
        return text + (f" Only batch {batch} was timed at seq {seq}; a second batch size in bench.batches would "
                       "separate a fixed cost per call from the work per sequence.")
    low, high = batches[:2]
    fits = {m: _fixed_cost(p50[m], low, high) for m in models}
    rising = [m for m, (fixed, _) in fits.items() if fixed <= 0]
    if rising:
        m = rising[0]
        return text + (f" From batch {low} to {high} the {m} model's p50 per sequence does not fall "
                       f"({p50[m][low] / low:.2f} -> {p50[m][high] / high:.2f} ms), so these rows show no fixed cost "
                       "per call to blame; the report holds no operator profile to say more.")
    (fixed_base, per_seq_base), (fixed_pruned, per_seq_pruned) = fits["baseline"], fits["pruned"]
    base_call = fixed_base + batch * per_seq_base
    expected = base_call / (fixed_base + batch * per_seq_base / ideal)
    text += (f" Fitting p50 = fixed + batch x per-sequence to batches {low} and {high}: a fixed "
             f"{fixed_base:.2f} ms per call (pruned: {fixed_pruned:.2f} ms), {fixed_base / base_call:.0%} of the "
             f"baseline's call at batch {batch}, which removing heads does not shrink; with it the expected speedup is "
             f"{expected:.2f}x, and the work per sequence shrank {per_seq_base / per_seq_pruned:.2f}x.")
    if entry["measured"] < EFFICIENCY_FLOOR * expected:
        text += " The rest of the gap is not explained by these rows; the report holds no operator profile."
    return text


# --- files ------------------------------------------------------------------------------------


def _write_bytes_atomic(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _save_figure(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    # No Software tag, so equal figures give equal bytes across matplotlib versions.
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return _write_bytes_atomic(path, buffer.getvalue())


def _new_figure(width: float, height: float):
    # A bare Figure on the Agg canvas leaves pyplot's global state alone (safe in notebooks and threads).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --- markdown ---------------------------------------------------------------------------------


def _si(n: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.1f}{suffix}"
    return f"{n:g}"


def _size(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def _points(drop: float) -> str:
    return f"{100 * drop:+.2f} pts"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _summary(report: dict) -> list[str]:
    model, metric = report["model"], report["task"]["metric"]
    lines = [
        f"- Heads kept: **{model['heads_kept']} of {model['heads_total']}** "
        f"({model['num_layers']} layers x {model['heads_per_layer']} heads).",
        f"- {metric.capitalize()} by stage: " + "; ".join(
            f"{s['stage']} {s['metric']:.4f} (drop {_points(s['drop'])})" for s in report["stages"]) + ".",
    ]
    ffn = model.get("ffn")
    if ffn:
        kept = sum(ffn["neurons_kept_per_layer"])
        empty = ffn["layers_without_matmuls"]
        lines.append(f"- Feed-forward neurons kept: **{kept} of {ffn['neurons_total']}** (blocks of {ffn['block_size']}; "
                     f"per layer {', '.join(map(str, ffn['neurons_kept_per_layer']))}); FLOPs per token kept at seq "
                     f"{ffn['flops_seq']}: **{ffn['flops_kept_fraction']:.1%}**"
                     + (f"; layers {', '.join(map(str, empty))} keep no heads and no neurons (no matrix products)."
                        if empty else "."))
    seq, points = _batch1_points(report)
    pruned = [(v, r) for v, r in points if v["pruned"]]
    if not pruned:
        return lines + ["- No pruned variant was timed at batch 1."]
    best, row = min(pruned, key=lambda p: p[1]["p50_ms"])
    ratio = next((s["p50_ratio"] for s in report["speedups"] if s["variant"] == best["name"]
                  and s["reference"] == REFERENCE and s["batch"] == 1 and s["seq"] == seq), None)
    speed = f", **{ratio:.2f}x** faster than {REFERENCE}" if ratio is not None else ""
    reference = next((v for v in report["variants"] if v["name"] == REFERENCE), None)
    size = _size(best["file_bytes"])
    if reference is not None:
        size += f" ({REFERENCE}: {_size(reference['file_bytes'])})"
    lines.append(f"- Fastest pruned variant at batch 1, seq {seq}: **{best['name']}**, p50 {row['p50_ms']:.2f} ms"
                 f"{speed}; {metric} {best['metric']:.4f}; file {size}.")
    return lines


def write_markdown(report: dict, path) -> Path:
    """Write report.md, the report for people, built from the report dict alone.

    It links the PNG plots by their standard names (``PLOT_FILES``) next to it; :func:`write_report`
    writes them.

    Args:
        report: a valid report.
        path: where report.md goes.

    Returns:
        The path written.
    """
    model, task, metric = report["model"], report["task"], report["task"]["metric"]
    lines = [f"# dsprune report: {model['name']} on {task['name']}", ""]
    noisy = _noisy_rows(report)
    if noisy:
        lines += [f"> **Warning: timings may be noisy** (1-minute load above the benchmark's threads + {BUSY_LOAD_FRACTION:g} x cores, or "
                  f"p50 spread over rounds above {MAX_SPREAD:g}, or no second round within "
                  f"{100 * CONFIRM_TOLERANCE:g}% of the best one): {'; '.join(noisy)}.", ""]
    lines += ["## Summary", "", *_summary(report), ""]

    lines += ["## Accuracy by stage", "",
              f"{metric} on {task['eval_examples']} evaluation examples; drop is against the fine-tuned "
              "unpruned model, in points.", ""]
    lines += _table(["Stage", "Variant", metric, "Drop"],
                    [[s["stage"], s["variant"] or "-", f"{s['metric']:.4f}", _points(s["drop"])]
                     for s in report["stages"]])

    lines += ["", "## Variants", ""]
    lines += _table(["Variant", "Engine", "Precision", "Device", metric, "Params", "FLOPs/token", "File"],
                    [[v["name"], v["engine"], v["precision"], v["device"], f"{v['metric']:.4f}", _si(v["params"]),
                      _si(v["flops_per_token"]), _size(v["file_bytes"])] for v in report["variants"]])

    ratios = {(s["variant"], s["batch"], s["seq"]): s["p50_ratio"]
              for s in report["speedups"] if s["reference"] == REFERENCE}
    rows = []
    for variant in report["variants"]:
        for r in sorted(variant["latency"], key=lambda r: (r["batch"], r["seq"])):
            if variant["name"] == REFERENCE:
                speed = "reference"
            else:
                ratio = ratios.get((variant["name"], r["batch"], r["seq"]))
                speed = "-" if ratio is None else f"{ratio:.2f}x"
            rows.append([variant["name"], str(r["batch"]), str(r["seq"]), str(r["threads"]), f"{r['p50_ms']:.2f}",
                         f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['throughput_per_s']:.1f}", speed])
    lines += ["", "## Latency", "",
              f"Per call (one batch), milliseconds; speedup is the p50 ratio against {REFERENCE}.", ""]
    lines += _table(["Variant", "Batch", "Seq", "Threads", "p50 ms", "p90 ms", "p99 ms", "Throughput/s", "Speedup"],
                    rows) if rows else ["No latency was measured."]

    if report.get("pruning_speedups"):
        lines += ["", "## Pruning speedup: measured against ideal", "",
                  "Pruned against unpruned on the same engine and precision. Ideal is the FLOP ratio from the "
                  "real module shapes; efficiency = measured / ideal.", ""]
        lines += _table(["Variant", "Batch", "Seq", "Measured", "Ideal", "Efficiency"],
                        [[s["variant"], str(s["batch"]), str(s["seq"]), f"{s['measured']:.2f}x", f"{s['ideal']:.2f}x",
                          f"{s['efficiency']:.2f}"] for s in report["pruning_speedups"]])
        short = [s for s in report["pruning_speedups"] if s["efficiency"] < EFFICIENCY_FLOOR]
        if short:
            lines += ["", f"Below {EFFICIENCY_FLOOR:g} of the ideal, what the rows say eats the difference:", ""]
            lines += [f"- {_shortfall(report, s)}" for s in short]
        else:
            lines += ["", f"Every pruned variant reaches at least {EFFICIENCY_FLOOR:g} of its FLOP ideal."]

    if "budget" in report:
        lines += ["", *_budget_markdown(report)]

    lines += ["", "## Gates", ""]
    lines += _table(["Gate", "Value", "Bound", "Result"],
                    [[g["name"], f"{g['value']:.4g}", f"{g['bound']:.4g}", "PASS" if g["passed"] else "**FAIL**"]
                     for g in report["gates"]]) if report["gates"] else ["No gates configured."]

    mask = head_mask(report)
    lines += ["", "## Kept heads per layer", ""]
    lines += _table(["Layer", "Kept", "Heads kept"],
                    [[str(layer), f"{sum(row)} of {len(row)}",
                      ", ".join(str(h) for h, kept in enumerate(row) if kept) or "(none)"]
                     for layer, row in enumerate(mask)])

    lines += ["", "## Plots", "",
              f"![p50 latency per variant]({PLOT_FILES['latency']})", "",
              f"![Kept heads]({PLOT_FILES['head_mask']})", "",
              f"![{metric} against latency]({PLOT_FILES['accuracy_latency']})", ""]

    machine = report["machine"]
    lines += ["## Machine and versions", "",
              f"- CPU: {machine['cpu']}, {machine['cores']} cores; load average "
              f"{' / '.join(f'{x:.2f}' for x in machine['load_avg'])} (1/5/15 min)",
              f"- Platform: {machine['platform']}; Python {machine['python']}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items())),
              f"- Created {report['created']}, seed {report['seed']}; schema {report['schema']}", ""]
    return _write_bytes_atomic(Path(path), "\n".join(lines).encode())


def _budget_markdown(report: dict) -> list[str]:
    budget = report["budget"]
    target, model, measured, gate = budget["target"], budget["cost_model"], budget["measured"], budget["gate"]
    statistic = target["statistic"].removesuffix("_ms")
    fit = model["fit"]
    setting = (f"{target['engine']} on {target['device']}, batch {target['batch']}, seq {target['seq']}, "
               f"{target['threads']} threads")
    if target["field"] == "throughput_per_s":
        asked = f"throughput >= {target['value']:g} sequences/s (mean <= {target['latency_ms']:.3f} ms per call)"
        got = f"{measured['throughput_per_s']:.1f} sequences/s (mean {measured['value_ms']:.3f} ms)"
    elif target["field"] == "latency_fraction":
        asked = (f"{statistic} <= {target['value']:g} x the unpruned model ({target['latency_ms']:.3f} ms when the "
                 "cost table was measured)")
        if measured.get("paired_fraction") is not None:
            got = (f"{measured['paired_fraction']:.3f} x the unpruned model (median over rounds of the two timed "
                   f"in the same round; fastest rounds {measured['value_ms']:.3f} and "
                   f"{measured['baseline_ms']:.3f} ms)")
        else:
            ratio = measured["value_ms"] / measured["baseline_ms"]
            got = (f"{statistic} {measured['value_ms']:.3f} ms = {ratio:.3f} x the unpruned "
                   f"{measured['baseline_ms']:.3f} ms timed beside it")
    else:
        asked = f"{statistic} <= {target['value']:g} ms"
        got = f"{statistic} {measured['value_ms']:.3f} ms"
    terms = ", ".join(f"{t.replace('_', ' ')} {fit['coefficients'][t]:+.4f}" for t in fit["terms"])
    loo = fit["loo_rms_rel_error"]
    units = budget.get("units")
    if units:
        planned = (f"- Planned a budget of **{units['budget_ms']:.3f} ms of heads and feed-forward blocks** "
                   f"({units['head_ms']:.4f} ms per head, {units['block_ms']:.4f} ms per block of "
                   f"{units['block_size']} neurons, {units['fixed_ms']:.3f} ms fixed), predicted {statistic} "
                   f"{budget['predicted_ms']:.3f} ms at most; joint DSP chose the mix.")
        calibration = units.get("calibration") or {}
        if "correction" in calibration:
            ratios = ", ".join(f"{p['keep']} heads + {p['blocks']} blocks {p['ratio']:.3f}"
                               for p in calibration["points"])
            planned += (f" The fit's first budget ({calibration['first_budget_ms']:.3f} ms) was spent three ways and "
                        f"timed; measured over fitted: {ratios}; the plan took the fit x "
                        f"{calibration['correction']:.3f}.")
        kept = f"{measured['keep']} heads, {measured['blocks']} blocks"
    else:
        planned = (f"- Planned **{budget['planned_keep']} heads**, predicted {statistic} "
                   f"{budget['predicted_ms']:.3f} ms (worst case over the layers a trained mask may empty).")
        kept = f"{measured['keep']} heads"
    lines = [
        "## Latency budget", "",
        f"- Budget: {asked}; {setting}; planning margin {target['margin']:.0%}.",
        planned,
        f"- Measured (bench stage, {kept}, {measured['empty_layers']} empty layer(s)): {got}; "
        f"the cost model predicts {measured['predicted_ms']:.3f} ms for this mask. "
        f"Budget **{'met' if gate['passed'] else 'MISSED'}**.",
        f"- Cost model: {statistic} ms = {terms} (ms per unit; {fit['points']} points, {model['fit_choice']}); "
        f"max error {fit['max_rel_error']:.1%}, RMS {fit['rms_rel_error']:.1%}"
        + (f", leave-one-out RMS {loo:.1%}" if loo is not None else "") + ".",
        f"- Cost table measured {model['measured']}, load average "
        f"{' / '.join(f'{x:.2f}' for x in model['machine']['load_avg'])} on {model['machine']['cores']} cores.",
    ]
    lines += [f"- **Warning:** {w}." for w in budget.get("warnings", [])]
    expected = budget.get("expected_metric")
    if expected:
        lines.append(f"- The study's {expected['metric']} at K {' and '.join(map(str, expected['keeps']))} "
                     f"({expected['variant']}, {expected['n']} rows): mean {expected['mean']:.4f}, "
                     f"min {expected['min']:.4f}, max {expected['max']:.4f}.")
    lines += ["", f"Cost table ({statistic}, each layout timed in its own process, rounds interleaved):", ""]
    block_columns = ["Blocks", "Blocks per layer"] if units else []
    lines += _table(["Heads", "Empty layers", "Per layer", *block_columns, f"Measured {statistic} ms", "Fitted ms",
                     "Error", "Spread", "Load"],
                    [[str(p["keep"]), str(p["empty_layers"]), " ".join(map(str, p["kept_per_layer"])),
                      *([str(p["blocks"]), " ".join(map(str, p["blocks_per_layer"]))] if units else []),
                      f"{p['value_ms']:.3f}", f"{p['fitted_ms']:.3f}", f"{p['fitted_ms'] / p['value_ms'] - 1:+.1%}",
                      f"{p['spread']:.2f}", f"{p['load_avg'][0]:.2f}"] for p in model["points"]])
    lines += ["", f"![Latency against heads kept]({BUDGET_PLOT})"]
    return lines


# --- plots ------------------------------------------------------------------------------------


def _paired_order(variants: list[dict]) -> list[dict]:
    """Variants with each baseline beside its pruned twin (same engine and precision)."""
    kinds = list(dict.fromkeys(v["name"].partition("/")[2] for v in variants))
    return sorted(variants, key=lambda v: (kinds.index(v["name"].partition("/")[2]), v["pruned"]))


_BASELINE_COLOR, _PRUNED_COLOR = "#7f8c9d", "#e07b39"


def plot_latency(report: dict, path) -> Path:
    """Bar chart of p50 latency per variant, one panel per (batch, seq), annotated with speedups.

    Baseline and pruned variants of the same engine and precision stand side by side; each bar is
    labelled with its p50 and its speedup against baseline/torch-fp32.

    Args:
        report: a valid report.
        path: where the PNG goes.

    Returns:
        The path written.
    """
    from matplotlib.patches import Patch

    variants = _paired_order([v for v in report["variants"] if v["latency"]])
    shapes = sorted({(r["batch"], r["seq"]) for v in variants for r in v["latency"]})
    ratios = {(s["variant"], s["batch"], s["seq"]): s["p50_ratio"]
              for s in report["speedups"] if s["reference"] == REFERENCE}
    fig = _new_figure(max(5.0, 0.9 * len(variants) + 1.5) * max(1, len(shapes)) if shapes else 6.0, 4.8)
    if not shapes:
        fig.text(0.5, 0.5, "No latency measured", ha="center", va="center")
        return _save_figure(fig, Path(path))
    axes = fig.subplots(1, len(shapes), squeeze=False)[0]
    for ax, (batch, seq) in zip(axes, shapes):
        bars = [(v, r) for v in variants for r in v["latency"] if (r["batch"], r["seq"]) == (batch, seq)]
        x = range(len(bars))
        heights = [r["p50_ms"] for _, r in bars]
        ax.bar(x, heights, color=[_PRUNED_COLOR if v["pruned"] else _BASELINE_COLOR for v, _ in bars],
               edgecolor="black", linewidth=0.6)
        for i, (v, r) in enumerate(bars):
            ratio = ratios.get((v["name"], batch, seq))
            label = f"{r['p50_ms']:.1f} ms"
            if v["name"] == REFERENCE:
                label += "\nref"
            elif ratio is not None:
                label += f"\n{ratio:.2f}x"
            ax.annotate(label, (i, r["p50_ms"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [v["name"] for v, _ in bars], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, max(heights) * 1.25)
        ax.set_title(f"batch {batch}, seq {seq}", fontsize=10)
        ax.set_ylabel("p50 latency per call (ms)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    # Outside the axes: inside, the legend hides bar labels whatever corner it takes.
    fig.legend(handles=[Patch(color=_BASELINE_COLOR, label="baseline"), Patch(color=_PRUNED_COLOR, label="pruned")],
               loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(f"{report['model']['name']}: p50 latency (lower is better; labels: speedup vs {REFERENCE})",
                 fontsize=10)
    return _save_figure(fig, Path(path))


def plot_head_mask(report: dict, path) -> Path:
    """Heatmap of the kept heads: layers down (layer 0 on top), heads across, kept dark.

    Args:
        report: a valid report.
        path: where the PNG goes.

    Returns:
        The path written.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    model = report["model"]
    mask = head_mask(report)
    layers, heads = model["num_layers"], model["heads_per_layer"]
    fig = _new_figure(min(14.0, 2.5 + 0.45 * heads), min(12.0, 1.6 + 0.4 * layers))
    ax = fig.subplots()
    ax.imshow(mask, cmap=ListedColormap(["#f2f2f2", "#1f5fa8"]), vmin=0, vmax=1, aspect="equal")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers), [f"{i} ({sum(row)})" for i, row in enumerate(mask)])
    ax.set_xticks([h - 0.5 for h in range(1, heads)], minor=True)
    ax.set_yticks([l - 0.5 for l in range(1, layers)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer (heads kept)")
    ax.set_title(f"{model['heads_kept']} of {model['heads_total']} heads kept", fontsize=11)
    ax.legend(handles=[Patch(color="#1f5fa8", label="kept"), Patch(facecolor="#f2f2f2", edgecolor="grey",
                                                                   label="pruned")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save_figure(fig, Path(path))


def plot_accuracy_latency(report: dict, path) -> Path:
    """Scatter of p50 latency at batch 1 (x, log scale) against the task metric, one point per variant.

    Args:
        report: a valid report.
        path: where the PNG goes.

    Returns:
        The path written.
    """
    from matplotlib.ticker import LogFormatter

    metric = report["task"]["metric"]
    seq, points = _batch1_points(report)
    fig = _new_figure(6.4, 4.6)
    ax = fig.subplots()
    if not points:
        ax.text(0.5, 0.5, "No latency measured at batch 1", ha="center", va="center", transform=ax.transAxes)
        return _save_figure(fig, Path(path))
    for pruned, marker, color in ((False, "o", _BASELINE_COLOR), (True, "^", _PRUNED_COLOR)):
        chosen = [(v, r) for v, r in points if v["pruned"] == pruned]
        if chosen:
            ax.scatter([r["p50_ms"] for _, r in chosen], [v["metric"] for v, _ in chosen], marker=marker, s=60,
                       color=color, edgecolor="black", linewidth=0.6, label="pruned" if pruned else "baseline",
                       zorder=3)
    for v, r in points:
        ax.annotate(v["name"], (r["p50_ms"], v["metric"]), xytext=(6, 4), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    low = min(r["p50_ms"] for _, r in points)
    high = max(r["p50_ms"] for _, r in points)
    ax.set_xlim(low / 1.3, high * 1.8)  # room on the right for the labels
    ax.margins(y=0.15)
    ax.set_xlabel(f"p50 latency at batch 1, seq {seq} (ms, log scale)")
    ax.set_ylabel(f"{metric} ({report['task']['name']})")
    ax.set_title(f"{metric} against latency (up and left is better)", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save_figure(fig, Path(path))


def plot_budget(report: dict, path) -> Path:
    """Latency against heads kept: the cost points, the fit, the budget line and the final measured point.

    Args:
        report: a valid report with a ``budget`` section.
        path: where the PNG goes.

    Returns:
        The path written.
    """
    budget = report["budget"]
    if budget.get("units"):
        return _plot_unit_budget(budget, Path(path))
    target, model, measured = budget["target"], budget["cost_model"], budget["measured"]
    statistic = target["statistic"].removesuffix("_ms")
    fig = _new_figure(7.0, 4.6)
    ax = fig.subplots()
    curve = sorted(budget["curve"], key=lambda p: p["keep"])
    ax.plot([p["keep"] for p in curve], [p["predicted_ms"] for p in curve], color="#1f5fa8", linewidth=1.5,
            label="fit, worst case over emptied layers")
    if any(abs(p["best_ms"] - p["predicted_ms"]) > 1e-9 for p in curve):
        ax.plot([p["keep"] for p in curve], [p["best_ms"] for p in curve], color="#1f5fa8", linewidth=1.0,
                linestyle=":", label="fit, most layers emptied")
    for packed, marker, label in ((False, "o", "measured, heads spread"), (True, "s", "measured, layers emptied")):
        # Packed layouts empty more layers than K heads spread evenly would.
        chosen = [p for p in model["points"]
                  if (p["empty_layers"] > max(0, len(p["kept_per_layer"]) - p["keep"])) == packed]
        if chosen:
            ax.scatter([p["keep"] for p in chosen], [p["value_ms"] for p in chosen], marker=marker, s=40,
                       color=_BASELINE_COLOR, edgecolor="black", linewidth=0.6, zorder=3, label=label)
    bound = target["latency_ms"]
    relative = f" ({target['value']:g} x unpruned in the cost table)" if target["field"] == "latency_fraction" else ""
    ax.axhline(bound, color="#c0392b", linewidth=1.2, label=f"budget {bound:.2f} ms{relative}")
    ax.axhline(bound / (1 + target["margin"]), color="#c0392b", linewidth=0.9, linestyle="--",
               label=f"budget less {target['margin']:.0%} margin")
    ax.axvline(budget["planned_keep"], color="grey", linewidth=0.8, linestyle=":")
    unpruned = max(p["keep"] for p in model["points"])  # the plan always times the unpruned layout
    ax.scatter([unpruned], [measured["baseline_ms"]], marker="D", s=40, facecolor="none", edgecolor=_PRUNED_COLOR,
               linewidth=1.2, zorder=4, label=f"unpruned, timed beside it: {measured['baseline_ms']:.2f} ms")
    ax.scatter([measured["keep"]], [measured["value_ms"]], marker="*", s=180, color=_PRUNED_COLOR,
               edgecolor="black", linewidth=0.6, zorder=4,
               label=f"final model: {measured['keep']} heads, {measured['value_ms']:.2f} ms")
    ax.set_xlabel(f"heads kept (planned {budget['planned_keep']})")
    ax.set_ylabel(f"{statistic} latency per call (ms)")
    _finish_budget_axes(ax, target)
    return _save_figure(fig, Path(path))


def _finish_budget_axes(ax, target: dict) -> None:
    """Title (the budget's engine and shape), grid and legend of a budget plot."""
    ax.set_title(f"{target['engine']}, batch {target['batch']}, seq {target['seq']}, {target['threads']} threads",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _plot_unit_budget(budget: dict, path: Path) -> Path:
    """Heads and blocks under one budget: measured against fitted latency of every layout, and the final model."""
    target, model, measured = budget["target"], budget["cost_model"], budget["measured"]
    statistic = target["statistic"].removesuffix("_ms")
    fig = _new_figure(6.4, 5.0)
    ax = fig.subplots()
    points = model["points"]
    ax.scatter([p["fitted_ms"] for p in points], [p["value_ms"] for p in points], marker="o", s=40,
               color=_BASELINE_COLOR, edgecolor="black", linewidth=0.6, zorder=3, label="cost table layouts")
    for p in points:
        ax.annotate(f"{p['keep']}h/{p['blocks']}b", (p["fitted_ms"], p["value_ms"]), fontsize=6,
                    xytext=(3, -8), textcoords="offset points")
    low = min(min(p["fitted_ms"], p["value_ms"]) for p in points)
    high = max(max(p["fitted_ms"], p["value_ms"]) for p in points)
    high = max(high, measured["predicted_ms"], measured["value_ms"])
    ax.plot([low, high], [low, high], color="#1f5fa8", linewidth=1.0, label="fit = measured")
    bound = target["latency_ms"]
    ax.axhline(bound, color="#c0392b", linewidth=1.2, label=f"budget {bound:.2f} ms")
    ax.axvline(budget["predicted_ms"], color="#c0392b", linewidth=0.9, linestyle="--",
               label=f"planned: predicted at most {budget['predicted_ms']:.2f} ms")
    ax.scatter([measured["predicted_ms"]], [measured["value_ms"]], marker="*", s=180, color=_PRUNED_COLOR,
               edgecolor="black", linewidth=0.6, zorder=4,
               label=f"final model: {measured['keep']} heads, {measured['blocks']} blocks, "
                     f"{measured['value_ms']:.2f} ms")
    ax.set_xlabel(f"fitted {statistic} (ms)")
    ax.set_ylabel(f"measured {statistic} latency per call (ms)")
    _finish_budget_axes(ax, target)
    return _save_figure(fig, path)


# --- entry points -----------------------------------------------------------------------------


def write_report(report: dict, out_dir) -> dict[str, Path]:
    """Validate a report and write report.json, the three PNG plots and report.md into a folder.

    Args:
        report: the report dict.
        out_dir: the folder (created when missing).

    Returns:
        Paths by name: ``json``, ``markdown``, ``latency``, ``head_mask``, ``accuracy_latency``, and
        ``budget`` when the report has a budget section.

    Raises:
        ValueError: the report does not follow the schema (nothing is written then).
    """
    validate_report(report)
    out = Path(out_dir)
    paths = {"json": _write_bytes_atomic(out / "report.json",
                                         (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())}
    paths["latency"] = plot_latency(report, out / PLOT_FILES["latency"])
    paths["head_mask"] = plot_head_mask(report, out / PLOT_FILES["head_mask"])
    paths["accuracy_latency"] = plot_accuracy_latency(report, out / PLOT_FILES["accuracy_latency"])
    if "budget" in report:
        paths["budget"] = plot_budget(report, out / BUDGET_PLOT)
    paths["markdown"] = write_markdown(report, out / "report.md")
    return paths


def compare_reports(old: dict, new: dict, *, metric_tolerance: float = 0.005,
                    latency_tolerance: float = 0.10) -> list[str]:
    """Regressions of a new report against an old one, as lines for people.

    Metrics are compared per stage and per variant (a stage whose variant is also compared as a
    variant is not reported twice); latency per variant and (batch, seq, threads) timed in both.

    Args:
        old: the earlier report.
        new: the report to judge.
        metric_tolerance: the largest allowed metric drop, in metric units (0.005 = 0.5 points).
        latency_tolerance: the largest allowed relative p50 increase (0.10 = 10%).

    Returns:
        One line per regression; empty when there is none.

    Raises:
        ValueError: the reports measure different tasks or metrics.
    """
    for field in ("name", "metric"):
        if old["task"][field] != new["task"][field]:
            raise ValueError(f"report.json: field 'task.{field}' differs ({old['task'][field]!r} vs "
                             f"{new['task'][field]!r}); the reports cannot be compared")
    metric = new["task"]["metric"]
    lines = []

    def check_metric(label: str, before: float, after: float) -> None:
        if before - after > metric_tolerance:
            lines.append(f"{label}: {metric} {before:.4f} -> {after:.4f} ({_points(after - before)}, "
                         f"tolerance {100 * metric_tolerance:.2f} pts)")

    old_variants = {v["name"]: v for v in old["variants"]}
    new_variants = {v["name"]: v for v in new["variants"]}
    compared = set(old_variants) & set(new_variants)
    old_stages = {s["stage"]: s for s in old["stages"]}
    for stage in new["stages"]:
        if stage["stage"] in old_stages and stage["variant"] not in compared:
            check_metric(f"stage {stage['stage']}", old_stages[stage["stage"]]["metric"], stage["metric"])
    for name, before in old_variants.items():
        if name not in new_variants:
            lines.append(f"{name}: missing from the new report")
            continue
        after = new_variants[name]
        check_metric(name, before["metric"], after["metric"])
        old_p50 = {(r["batch"], r["seq"], r["threads"]): r["p50_ms"] for r in before["latency"]}
        for row in after["latency"]:
            key = (row["batch"], row["seq"], row["threads"])
            if key in old_p50 and row["p50_ms"] > old_p50[key] * (1 + latency_tolerance):
                lines.append(f"{name} batch {key[0]} seq {key[1]} threads {key[2]}: p50 {old_p50[key]:.2f} ms -> "
                             f"{row['p50_ms']:.2f} ms ({row['p50_ms'] / old_p50[key] - 1:+.1%}, "
                             f"tolerance {latency_tolerance:.0%})")
    return lines
