"""Latency budgets: layouts, the cost fit, the planner (exact answers on synthetic tables), config
rules, the report's budget gate (exit 1 from fixed bench rows) and ``dsprune plan``."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conftest import ROOT, run_cli
from pipeline.budget import (
    BudgetUnreachable,
    CostFit,
    concentrated_layout,
    cost_layouts,
    default_grid,
    empty_layer_range,
    expected_metric,
    fit_cost_model,
    fit_linear,
    plan_heads,
    predict_keep,
    resolve_target,
    spread_layout,
    unreachable_message,
)
from pipeline.config import ConfigError, load_config

BUDGET_CONFIG = ROOT / "configs" / "sst2-minilm-budget.yaml"


def _points(cost, layouts=None, key="p50_ms"):
    """Cost points of MiniLM's default layouts (6 x 12) with latencies from ``cost(keep, empty_layers)``."""
    layouts = layouts or cost_layouts(default_grid(6, 12), 6, 12)
    return [{**item, key: cost(item["keep"], item["empty_layers"])} for item in layouts]


def _fit(intercept, per_head, per_empty=None):
    terms = ("intercept", "heads") + (("empty_layers",) if per_empty is not None else ())
    coefficients = (intercept, per_head) + ((per_empty,) if per_empty is not None else ())
    return CostFit(terms, coefficients, 0.0, 0.0, None, 5)


# --- layouts --------------------------------------------------------------------------------------


def test_layouts_spread_and_pack_heads():
    assert spread_layout(18, 6, 12) == (3, 3, 3, 3, 3, 3)
    assert spread_layout(8, 6, 12) == (2, 2, 1, 1, 1, 1)
    assert spread_layout(4, 6, 12) == (1, 1, 1, 1, 0, 0)
    assert concentrated_layout(18, 6, 12) == (12, 6, 0, 0, 0, 0)
    assert concentrated_layout(72, 6, 12) == (12,) * 6
    assert default_grid(6, 12) == (72, 54, 36, 18, 0)
    layouts = cost_layouts(default_grid(6, 12), 6, 12)
    assert [(x["keep"], x["empty_layers"]) for x in layouts] == [
        (72, 0), (54, 0), (54, 1), (36, 0), (36, 3), (18, 0), (18, 4), (0, 6)]
    assert all(sum(x["layout"]) == x["keep"] for x in layouts)
    assert empty_layer_range(4, 6, 12) == (2, 5)
    assert empty_layer_range(36, 6, 12) == (0, 3)
    assert empty_layer_range(36, 6, 12, per_layer=True) == (0, 0)
    with pytest.raises(ValueError, match="keep 73 outside 0..72"):
        spread_layout(73, 6, 12)


# --- the fit --------------------------------------------------------------------------------------


def test_fit_recovers_known_linear_costs_and_keeps_heads_alone():
    points = _points(lambda k, e: 2.0 + 0.125 * k)
    fit, fits, reason = fit_cost_model(points, "p50_ms")
    assert fit.terms == ("intercept", "heads")
    assert reason == "heads alone: the empty layers term left the leave-one-out error at 0.0% against 0.0%"
    assert fit.coefficients == pytest.approx((2.0, 0.125), abs=1e-9)
    assert fit.max_rel_error == pytest.approx(0, abs=1e-9) and fit.loo_rms_rel_error == pytest.approx(0, abs=1e-9)
    assert [f.terms[-1] for f in fits] == ["heads", "empty_layers"]
    assert fit.predict({"intercept": 1, "heads": 40, "empty_layers": 3}) == pytest.approx(7.0)


def test_fit_takes_the_empty_layer_term_when_it_predicts_better():
    points = _points(lambda k, e: 2.0 + 0.125 * k - 0.25 * e)
    fit, _, reason = fit_cost_model(points, "p50_ms")
    assert fit.terms == ("intercept", "heads", "empty_layers")
    assert fit.coefficients == pytest.approx((2.0, 0.125, -0.25), abs=1e-9)
    assert "empty layers term cut the leave-one-out error" in reason


def test_fit_errors_are_relative_to_the_measured_points():
    # Four points on 1 + K, one of them 10% slow: the line moves, and the errors say by how much.
    points = [{"layout": [k], "p50_ms": 1.0 + k} for k in (0, 1, 2, 3)]
    points[3]["p50_ms"] = 4.4
    fit = fit_linear(points, ("intercept", "heads"), "p50_ms")
    # Least squares by hand: x = 0..3, y = 1, 2, 3, 4.4 -> slope 1.12, intercept 0.92.
    assert fit.coefficients == pytest.approx((0.92, 1.12))
    residuals = [abs(0.92 + 1.12 * k - y) / y for k, y in zip(range(4), (1, 2, 3, 4.4))]
    assert fit.max_rel_error == pytest.approx(max(residuals))
    assert fit.rms_rel_error == pytest.approx(math.sqrt(sum(r * r for r in residuals) / 4))
    assert fit.loo_rms_rel_error > fit.rms_rel_error
    with pytest.raises(ValueError, match="cannot determine a fit"):
        fit_linear(points[:1], ("intercept", "heads"), "p50_ms")
    assert CostFit.from_dict(fit.to_dict()) == fit


# --- the planner ----------------------------------------------------------------------------------


def _target(latency_ms, **kwargs):
    return resolve_target("latency_ms", latency_ms, percentile="p50", batch=1, **kwargs)


@pytest.mark.parametrize("budget_ms, margin, per_layer, keep", [
    (10.0, 0.25, False, 48),     # 2 + 0.125 K = 8 exactly at K 48: equal meets
    (9.99, 0.25, False, 47),     # just under: one head less
    (9.99, 0.25, True, 42),      # per layer: multiples of 6
    (11.0, 0.0, False, 72),      # the unpruned model meets it
    (100.0, 0.5, False, 72),
    (2.125, 0.0, False, 1),      # only the smallest K
])
def test_planner_gives_the_largest_k_within_the_margin(budget_ms, margin, per_layer, keep):
    plan = plan_heads(_fit(2.0, 0.125), _target(budget_ms), num_layers=6, heads_per_layer=12, margin=margin,
                      per_layer=per_layer)
    assert plan.reachable and plan.keep == keep
    assert plan.predicted_ms == pytest.approx(2.0 + 0.125 * keep)
    assert [p["keep"] for p in plan.curve] == (list(range(72, 0, -6)) if per_layer else list(range(72, 0, -1)))


def test_planner_refuses_an_unreachable_budget_with_the_fastest_latency():
    target = _target(2.0)
    plan = plan_heads(_fit(2.0, 0.125), target, num_layers=6, heads_per_layer=12, margin=0.05)
    assert not plan.reachable and plan.keep is None
    assert (plan.smallest_keep, plan.smallest_ms) == (1, 2.125)
    message = unreachable_message(target, plan, 0.05, fastest_measured_ms=1.98, setting="onnx-int8 on cpu")
    assert "\n" not in message and message.startswith("budget.latency_ms: 2 ms (p50 <= 2.000 ms) is out of reach")
    assert "1 head(s) are predicted at 2.125 ms (2.231 ms with the 5% margin)" in message
    assert "every head removed it measured 1.980 ms" in message
    with pytest.raises(BudgetUnreachable):  # a ValueError: the CLI maps it to exit 2
        raise BudgetUnreachable(message)


def test_planner_assumes_the_slowest_spread_of_heads_over_layers():
    # Emptying a layer saves 0.5 ms: a mask of K heads may empty from max(0, 6 - K) to 6 - ceil(K / 12) layers.
    fit = _fit(5.0, 0.125, -0.5)
    assert predict_keep(fit, 24, 6, 12) == (5.0 + 3.0 - 2.0, 5.0 + 3.0)
    assert predict_keep(fit, 3, 6, 12) == (5.0 + 0.375 - 2.5, 5.0 + 0.375 - 1.5)
    # 5 + 0.125 K <= 9 -> K 32, though a mask emptying two layers would be faster.
    assert plan_heads(fit, _target(9.0), num_layers=6, heads_per_layer=12, margin=0.0).keep == 32


def test_throughput_and_relative_budgets():
    fit = _fit(2.0, 0.125)
    # 1000 sequences/s at batch 4 is a mean of 4 ms per call: 2 + 0.125 K <= 4 -> K 16.
    target = resolve_target("throughput_per_s", 1000.0, percentile="p99", batch=4)
    assert (target.statistic, target.latency_ms) == ("mean_ms", 4.0)
    assert plan_heads(fit, target, num_layers=6, heads_per_layer=12, margin=0.0).keep == 16
    # With the 25% margin: 2 + 0.125 K <= 3.2 -> K 9.
    assert plan_heads(fit, target, num_layers=6, heads_per_layer=12, margin=0.25).keep == 9
    unreachable = plan_heads(fit, resolve_target("throughput_per_s", 2000.0, percentile="p50", batch=4),
                             num_layers=6, heads_per_layer=12, margin=0.0)
    message = unreachable_message(resolve_target("throughput_per_s", 2000.0, percentile="p50", batch=4),
                                  unreachable, 0.0, fastest_measured_ms=None, setting="x")
    assert message.startswith("budget.throughput_per_s: 2000 sequences/s is out of reach")
    assert "predicted at 1882.4/s" in message  # 4000 / 2.125
    # Half the unpruned p50 (11 ms at 72 heads): 5.5 ms -> K 28.
    target = resolve_target("latency_fraction", 0.5, percentile="p50", batch=1, unpruned_ms={"p50_ms": 11.0})
    assert target.latency_ms == 5.5
    assert plan_heads(fit, target, num_layers=6, heads_per_layer=12, margin=0.0).keep == 28
    with pytest.raises(ValueError, match="needs the unpruned model's measured latency"):
        resolve_target("latency_fraction", 0.5, percentile="p50", batch=1)


def test_a_busy_or_unstable_table_or_a_loose_fit_is_flagged():
    from pipeline.budget import measurement_warnings

    quiet = [{"load_avg": [2.4, 1, 1], "spread": 1.1}, {"load_avg": [2.0, 1, 1], "spread": 1.2}]
    assert measurement_warnings(quiet, cores=2, threads=2, fit=_fit(1, 1), margin=0.05) == []
    busy = [{"load_avg": [5.6, 4, 3], "spread": 1.77}, {"load_avg": [2.0, 1, 1], "spread": 1.0}]
    loose = dataclasses.replace(_fit(1, 1), max_rel_error=0.211, rms_rel_error=0.12)
    warnings = measurement_warnings(busy, cores=2, threads=2, fit=loose, margin=0.05)
    assert len(warnings) == 3
    assert warnings[0].startswith("the machine was busy while the cost table was timed (1-minute load up to 5.60")
    assert warnings[1] == "1 of 2 layouts varied over 1.2x between rounds (up to 1.77x)"
    assert warnings[2] == "the fit misses the measured points by 12.0% RMS (up to 21.1%), more than the 5% margin"
    assert measurement_warnings(quiet, cores=2, threads=2, fit=dataclasses.replace(loose, rms_rel_error=0.04),
                                margin=0.05) == []
    # Fastest-round rows: a wide spread is fine when a second round confirms the fastest.
    best = [{"load_avg": [2.0, 1, 1], "spread": 1.61, "aggregate": "best", "rounds": 5, "confirmed_rounds": 2},
            {"load_avg": [2.0, 1, 1], "spread": 1.03, "aggregate": "best", "rounds": 5, "confirmed_rounds": 1}]
    assert measurement_warnings(best, cores=2, threads=2, fit=_fit(1, 1), margin=0.05) == [
        "1 of 2 layouts had no second round within 5% of their fastest (spread up to 1.03x)"]


def test_expected_metric_brackets_the_planned_k():
    rows = [{"kind": "row", "variant": "dsp:joint", "task": "sst2", "metric": "accuracy", "keep": k, "value": v}
            for k, v in ((36, 0.88), (36, 0.90), (54, 0.89), (54, 0.91), (72, 0.92))]
    rows.append({"kind": "row", "variant": "random", "task": "sst2", "metric": "accuracy", "keep": 48, "value": 0.5})
    got = expected_metric(rows, variant="dsp:joint", task="sst2", keep=48)
    assert got["keeps"] == [36, 54] and got["n"] == 4
    assert (got["min"], got["max"]) == (0.88, 0.91) and got["mean"] == pytest.approx(0.895)
    assert expected_metric(rows, variant="dsp:joint", task="sst2", keep=54)["keeps"] == [54]
    assert expected_metric(rows, variant="dsp:joint", task="sst2", keep=80)["keeps"] == [72]
    assert expected_metric(rows, variant="ste:joint", task="sst2", keep=48) is None


# --- config ---------------------------------------------------------------------------------------


def test_budget_config_loads_and_conflicts_are_one_line():
    cfg = load_config(BUDGET_CONFIG)
    assert cfg.budget.active and cfg.budget.target_fields == ("latency_fraction",)
    cfg = load_config(BUDGET_CONFIG, ["budget.latency_fraction=null", "budget.latency_ms=8"])
    assert cfg.budget.target_fields == ("latency_ms",) and cfg.budget.latency_ms == 8.0
    assert not load_config(ROOT / "configs" / "sst2-minilm.yaml").budget.active
    with pytest.raises(ConfigError) as err:
        load_config(BUDGET_CONFIG, ["prune.keep=36", "budget.latency_ms=8", "budget.percentile=p42",
                                    "budget.device=cuda", "budget.margin=1.5", "quantize.presets=[int8-static]"])
    message = str(err.value)
    assert "\n" not in message
    for expected in ("budget.percentile: must be p50, p90 or p99, got 'p42'",
                     "budget.device: must be cpu", "budget.margin: must be in [0, 1), got 1.5",
                     "budget: set one of budget.latency_ms, budget.latency_fraction, not several",
                     "prune.keep: 36 conflicts with budget.latency_ms (8.0); the budget plans the head count",
                     "budget.engine: onnx-int8 is the int8-dynamic preset, missing from quantize.presets"):
        assert expected in message, expected


# --- the budget gate in the report: exit 1 from fixed bench rows ----------------------------------


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _bench_row(variant, p50, batch=1, seq=128, rounds=None):
    engine = "torch" if "torch" in variant else "onnxruntime"
    row = {"variant": variant, "pruned": variant.startswith("pruned"), "engine": engine,
           "precision": variant.rsplit("-", 1)[1], "device": "cpu", "threads": 2, "batch": batch, "seq": seq,
           "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2, "mean_ms": p50 * 1.02,
           "throughput_per_s": batch * 1000 / (p50 * 1.02), "spread": 1.02, "load_avg": [0.5, 0.5, 0.5]}
    return row if rounds is None else {**row, "rounds_p50_ms": rounds}


def _fake_run(tmp_path, overrides, pruned_p50, rounds=(None, None)):
    """A complete run folder up to bench, with fixed bench rows: only the report stage is left to run."""
    from pipeline.run import STAGES, hash_tree
    from pipeline.stages.plan import make_plan

    run_dir = tmp_path / "run"
    cfg = load_config(BUDGET_CONFIG, [f"run_dir={run_dir}", "bench.engines=[onnx-int8]", "bench.batches=[1]",
                                      "budget.margin=0.05", *overrides])
    costs = {"key": {}, "measured": "2026-05-09T12:00:00+00:00",
             "machine": {"cores": 2, "load_avg": [0.4, 0.5, 0.6], "cpu": "test"},
             "points": [{**p, "p90_ms": p["p50_ms"] * 1.1, "p99_ms": p["p50_ms"] * 1.2, "mean_ms": p["p50_ms"],
                         "throughput_per_s": 1000 / p["p50_ms"], "spread": 1.01, "load_avg": [0.4, 0.5, 0.6]}
                        for p in _points(lambda k, e: 4.0 + 0.0625 * k)]}  # 8.5 ms unpruned
    plan = make_plan(cfg, costs, 6, 12)
    cfg = dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, keep=plan["keep"]))
    kept = {str(layer): list(range(n)) for layer, n in enumerate(spread_layout(plan["keep"], 6, 12))}
    mask = [[1 if h < len(kept[str(layer)]) else 0 for h in range(12)] for layer in range(6)]
    accuracy = {"accuracy": 0.9}
    both = {"baseline": accuracy, "pruned": accuracy}
    _write(run_dir / "config.json", cfg.to_dict())
    _write(run_dir / "plan" / "plan.json", plan)
    _write(run_dir / "plan" / "costs.json", costs)
    _write(run_dir / "finetune" / "metrics.json", {"task": "sst2", "metric": "accuracy", "eval_examples": 872,
                                                   "baseline": accuracy})
    _write(run_dir / "harden" / "mask.json", {"kept_heads": kept, "mask": mask})
    _write(run_dir / "harden" / "metrics.json", {"hardened": accuracy})
    flops = {"128": 1000}
    _write(run_dir / "prune" / "metrics.json", {"pruned": accuracy, "params": {"baseline": 100, "pruned": 90},
                                                "flops_per_token": {"baseline": flops, "pruned": flops}})
    _write(run_dir / "export" / "metrics.json", {"onnx-fp32": both})
    _write(run_dir / "quantize" / "metrics.json", {"metrics": {"int8-dynamic": both}})
    _write(run_dir / "bench" / "machine.json", {"cpu": "test", "cores": 2, "load_avg": [0.4, 0.5, 0.6],
                                                "platform": "linux", "python": "3"})
    rows = [_bench_row("baseline/onnx-int8", 8.5, rounds=rounds[0]),
            _bench_row("pruned/onnx-int8", pruned_p50, rounds=rounds[1])]
    _write(run_dir / "bench" / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    stages = {s.name: {"config_hash": cfg.section_hash(*s.sections), "inputs": {},
                       "outputs": hash_tree(run_dir / s.name), "seed": 0}
              for s in STAGES if s.name not in ("report", "artifact")}
    _write(run_dir / "manifest.json", {"stages": stages})
    return run_dir, plan


def test_a_missed_budget_exits_1_with_the_measured_latency(tmp_path):
    # 8 ms: 4 + 0.0625 K <= 8 / 1.05 -> K 57; the pruned model then measures 8.4 ms.
    run_dir, plan = _fake_run(tmp_path, ["budget.latency_fraction=null", "budget.latency_ms=8"], pruned_p50=8.4)
    assert plan["keep"] == 57 and plan["fit"]["terms"] == ["intercept", "heads"]
    result = run_cli("report", str(run_dir))
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == "dsprune: gate failed: gate budget.latency_ms (pruned/onnx-int8 p50 ms, batch 1, seq 128): 8.4 vs bound 8"

    from benchmarks.report import validate_report

    report = json.loads((run_dir / "report" / "report.json").read_text())
    validate_report(report)
    budget = report["budget"]
    assert budget["planned_keep"] == 57 and budget["measured"]["keep"] == 57
    assert budget["measured"]["value_ms"] == 8.4 and not budget["gate"]["passed"]
    assert budget["measured"]["predicted_ms"] == pytest.approx(4.0 + 0.0625 * 57)
    assert len(budget["cost_model"]["points"]) == 8
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "## Latency budget" in markdown and "Budget **MISSED**" in markdown and "![Latency against heads kept]" in markdown
    assert (run_dir / "report" / "budget.png").stat().st_size > 0


def test_a_met_relative_budget_passes_on_the_ratio_timed_beside_the_baseline(tmp_path):
    # 85% of 8.5 ms = 7.225 ms: 4 + 0.0625 K <= 7.225 / 1.05 -> K 46. Measured 7.0 / 8.5 = 0.82.
    run_dir, plan = _fake_run(tmp_path, [], pruned_p50=7.0)
    assert plan["keep"] == 46 and plan["expected_metric"]["variant"] == "dsp:joint"
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    gate = json.loads((run_dir / "report" / "report.json").read_text())["budget"]["gate"]
    assert gate["passed"] and gate["value"] == pytest.approx(7.0 / 8.5) and gate["bound"] == 0.85
    assert "budget: 46 heads planned" in result.stdout


def test_a_relative_budget_is_judged_on_rounds_timed_side_by_side(tmp_path):
    # The fastest rounds give 7.4 / 8.5 = 0.871, over 85%; but in every round but the first the
    # baseline ran slower beside a slower pruned model: per round 0.871, 0.837, 0.840 -> median 0.840.
    run_dir, _ = _fake_run(tmp_path, [], pruned_p50=7.4, rounds=([8.5, 9.8, 9.4], [7.4, 8.2, 7.9]))
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    gate = report["budget"]["gate"]
    assert gate["passed"] and gate["value"] == pytest.approx(7.9 / 9.4)
    assert gate["name"] == ("budget.latency_fraction (median over rounds of pruned/onnx-int8 p50 over baseline p50 "
                            "timed in the same round, batch 1, seq 128)")
    assert report["budget"]["measured"]["paired_fraction"] == pytest.approx(7.9 / 9.4)
    assert "0.840 x the unpruned model (median over rounds" in (run_dir / "report" / "report.md").read_text()


def test_a_relative_budget_is_planned_on_paired_rounds():
    from pipeline.budget import paired_fraction, paired_points

    assert paired_fraction([5.5, 6.0, 5.5], [10.0, 12.0, 11.0]) == pytest.approx(0.5)
    assert paired_fraction([1.0], [1.0, 2.0]) is None and paired_fraction([], []) is None
    # A round in the VM's slow mode (both 1.6x, by added time rather than scale) is not paired.
    assert paired_fraction([3.6, 7.7, 3.7, 3.8], [6.9, 12.0, 6.9, 7.0]) == pytest.approx(3.7 / 6.9)
    # When no round is fast for both, there are no pairs: the caller falls back to the fastest rounds.
    assert paired_fraction([3.6, 5.0], [9.0, 6.0]) is None
    unpruned = {"p50_ms": 10.0, "rounds_p50_ms": [10.0, 12.0, 11.0]}
    # The layout's fastest round (5.5 ms) fell in a round where the unpruned model ran at 11 ms:
    # against the unpruned model's fastest, 0.55; against the model timed beside it, 0.5.
    points = paired_points([{"keep": 36, "p50_ms": 5.5, "rounds_p50_ms": [5.5, 6.0, 5.5]}], unpruned)
    assert points[0]["paired_fraction"] == pytest.approx(0.5) and points[0]["p50_ms"] == pytest.approx(5.0)
    assert points[0]["best_p50_ms"] == 5.5
    assert paired_points([{"keep": 36, "p50_ms": 5.5}], unpruned) is None  # no rounds: the plan fits as measured


# --- dsprune plan ---------------------------------------------------------------------------------


def _cached_costs(run_dir, overrides, cost):
    """Put a cost table in ``run_dir/plan`` under the key `dsprune plan` computes, so it is reused, not measured."""
    from pipeline.stages.plan import measurement_key

    cfg = load_config(BUDGET_CONFIG, [f"run_dir={run_dir}", *overrides])
    layouts = cost_layouts(default_grid(6, 12), 6, 12)
    points = [{**p, "p90_ms": p["p50_ms"], "p99_ms": p["p50_ms"], "mean_ms": p["p50_ms"],
               "throughput_per_s": 1000 / p["p50_ms"], "rounds_p50_ms": [p["p50_ms"]], "spread": 1.0,
               "load_avg": [0.1, 0.1, 0.1]} for p in _points(cost, layouts)]
    _write(run_dir / "plan" / "costs.json", {"key": measurement_key(cfg, layouts, 2),
                                             "measured": "2026-05-09T12:00:00+00:00",
                                             "machine": {"cores": 2, "load_avg": [0.1, 0.1, 0.1]}, "points": points})


def test_plan_command_prints_k_and_the_curve_and_refuses_the_unreachable(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["budget.margin=0.05", "budget.latency_fraction=null", "budget.latency_ms=8"]
    _cached_costs(run_dir, overrides, lambda k, e: 4.0 + 0.0625 * k)
    args = ("plan", "-c", str(BUDGET_CONFIG), "--set", f"run_dir={run_dir}", *sum((["--set", o] for o in overrides), []))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Planned: keep 57 of 72 heads, predicted p50 7.562 ms (7.941 ms with the margin) against 8.000 ms" in out
    assert "    72: 8.500 ms (best 8.500) misses  measured 8.500" in out
    assert "    57: 7.562 ms (best 7.562) meets  <- planned" in out
    assert "Expected accuracy at 57 heads (dsp:joint, study rows at K 54 and 72" in out
    assert json.loads((run_dir / "config.json").read_text())["prune"]["keep"] == 57
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["plan"]["summary"]["cost_table"] == "reused"

    refused = run_cli(*args[:-1], "budget.latency_ms=3.5")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Refused: budget.latency_ms: 3.5 ms" in refused.stdout and "    72: 8.500 ms" in refused.stdout
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("dsprune: error: budget.latency_ms: 3.5 ms (p50 <= 3.500 ms) is out of reach on this "
                           "machine: 1 head(s) are predicted at 4.06"), last  # 4 + 0.0625, fitted
    assert "every head removed it measured 4.000 ms (onnx-int8 on cpu, batch 1, seq 128, 2 threads)" in last

    missing = run_cli(*args, "--set", "budget.study=nope.json")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        "dsprune: error: budget.study: 'nope.json' is not a file (a benchmarks/results/study-*.json)")

    # `dsprune run` refuses the same budget before any training, exit 2.
    run = run_cli("run", *args[1:-1], "budget.latency_ms=3.5")
    assert run.returncode == 2 and "is out of reach on this machine" in run.stderr.strip().splitlines()[-1]
    assert "[plan] up to date, skipped" in run.stderr and not (run_dir / "finetune").exists()


def test_a_multi_process_launch_trains_only_a_plan_made_before_it(tmp_path, monkeypatch):
    """Under torchrun, rank 0 would time the cost table for minutes while the other ranks read a plan
    not yet written: every rank needs a current plan (`dsprune plan`, one process) and stops with the
    same line without one, or with --force, before anything is written or trained."""
    from pipeline.run import run_pipeline

    run_dir = tmp_path / "run"
    overrides = ["budget.margin=0.05", "budget.latency_fraction=null", "budget.latency_ms=8"]
    _cached_costs(run_dir, overrides, lambda k, e: 4.0 + 0.0625 * k)
    planned = run_cli("plan", "-c", str(BUDGET_CONFIG), "--set", f"run_dir={run_dir}",
                      *sum((["--set", o] for o in overrides), []))
    assert planned.returncode == 0, planned.stderr[-2000:]

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = load_config(BUDGET_CONFIG, [f"run_dir={run_dir}", *overrides])
    run_pipeline(cfg, only="harden", log=lambda event: None)  # rank 1: the plan is current, nothing to do alone
    other = load_config(BUDGET_CONFIG, [f"run_dir={run_dir}", *overrides[:-1], "budget.latency_ms=7.5"])
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        for config, force in ((other, False), (cfg, True)):
            with pytest.raises(ValueError, match=r"^budget: 2 processes launched, .* run `dsprune plan -c CONFIG`"):
                run_pipeline(config, force=force, log=lambda event: None)
    assert not (run_dir / "finetune").exists()
    assert json.loads((run_dir / "plan" / "plan.json").read_text())["target"]["latency_ms"] == 8
    assert json.loads((run_dir / "config.json").read_text())["budget"]["latency_ms"] == 8  # left as planned


def _tiny_budget_config(tmp_path, tokenizer, *, engines: str, extra: str = "", budget_extra: str = ""):
    """A config running the tiny model on an SST-2 slice with a budget of 1000 ms (onnx-int8, batch 1,
    seq 24); skips without the data. Returns (config path, run folder)."""
    from conftest import GLUE, make_tiny_bert
    from pipeline.surgery import save_pruned

    if not (GLUE / "SST-2").is_dir():
        pytest.skip("needs ../shared/data/glue/SST-2")
    model_dir = save_pruned(make_tiny_bert(), tmp_path / "tiny", tokenizer)
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny-budget.yaml"
    config.write_text(f"run_dir: {run_dir}\nmodel: {{name: {model_dir}}}\n"
                      "data: {max_train_examples: 32, max_eval_examples: 32, max_seq_length: 16}\n"
                      "finetune: {batch_size: 16}\nquantize: {presets: [int8-dynamic]}\n" + extra +
                      "bench: {batches: [1], seqs: [16], warmup: 1, runs: 3, min_seconds: 0, rounds: 1, "
                      f"engines: [{engines}]}}\n"
                      "gates: {max_metric_drop: null}\n"
                      f"budget: {{latency_ms: 1000, batch: 1, seq: 24, engine: onnx-int8{budget_extra}}}\n")
    return config, run_dir


@pytest.mark.integration
def test_run_with_a_budget_trains_the_planned_k_and_checks_it(tmp_path, tokenizer):
    """dsprune run end to end on the tiny model: a real cost table, the planned K trained, the budget's
    shape timed and gated; then a rerun skips everything and an impossible budget stops before training."""
    config, run_dir = _tiny_budget_config(tmp_path, tokenizer, engines="torch-fp32")
    result = run_cli("run", "-c", str(config))
    # prune.keep's default (36) exceeds the tiny model's 8 heads: the run only works with the planned K.
    assert result.returncode == 0, result.stderr[-2000:]
    costs = json.loads((run_dir / "plan" / "costs.json").read_text())  # timed on this machine
    assert [(p["keep"], p["empty_layers"]) for p in costs["points"]] == [
        (8, 0), (6, 0), (4, 0), (4, 1), (2, 0), (2, 1), (0, 2)]
    assert all(0 < p["p50_ms"] <= p["p99_ms"] and len(p["rounds_p50_ms"]) == 1 for p in costs["points"])
    assert len(costs["machine"]["load_avg"]) == 3 and costs["key"]["seq"] == 24
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert plan["keep"] == 8 == report["model"]["heads_kept"] == report["budget"]["planned_keep"]
    assert json.loads((run_dir / "config.json").read_text())["prune"]["keep"] == 8
    rows = [json.loads(line) for line in (run_dir / "bench" / "rows.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["seq"]) for r in rows} == {
        (f"{m}/{e}", s) for m in ("baseline", "pruned") for e in ("torch-fp32", "onnx-int8") for s in (16, 24)}
    gate = report["gates"][0]
    assert gate["name"] == "budget.latency_ms (pruned/onnx-int8 p50 ms, batch 1, seq 24)" and gate["passed"]
    assert gate["value"] == next(r["p50_ms"] for r in rows if r["variant"] == "pruned/onnx-int8" and r["seq"] == 24)
    assert "[plan] prune.keep = 8: predicted p50" in result.stderr

    from benchmarks.budget_check import main as budget_check

    assert budget_check([str(run_dir), "--out", str(tmp_path / "check.json")]) == 0  # K = every head, and it meets
    checked = json.loads((tmp_path / "check.json").read_text())
    assert checked["within_one_step"] and checked["layouts"]["planned"]["keep"] == 8
    assert checked["layouts"]["planned"]["value_ms"] > 0

    again = run_cli("run", "-c", str(config))
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 9, again.stderr[-2000:]
    # An impossible budget: the plan reruns on the cached table and the run stops before training, exit 2.
    refused = run_cli("run", "-c", str(config), "--set", "budget.latency_ms=0.001")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "[finetune]" not in refused.stderr and "is out of reach on this machine" in refused.stderr
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["plan"]["summary"]["cost_table"] == "reused"


def test_budget_check_grows_the_mask_by_the_gates_ranking():
    from benchmarks.budget_check import layouts_to_check

    logits = [[1e6 + 3, 5.0, 1e6 + 1, -2.0], [4.0, 1e6 + 2, 6.0, 0.5], [0.1, 0.2, 0.3, 1e6]]
    kept = {"0": [0, 2], "1": [1], "2": [3]}
    layouts = layouts_to_check(logits, kept, step=2)
    # the next two heads outside the mask: (1, 2) at 6.0 and (0, 1) at 5.0
    assert layouts == {"unpruned": [4, 4, 4], "planned": [2, 1, 1], "planned+step": [3, 2, 1]}
    assert layouts_to_check(logits, kept, step=20)["planned+step"] == [4, 4, 4]


def test_budget_check_refuses_a_run_without_a_budget(tmp_path, capsys):
    from benchmarks.budget_check import main as budget_check

    (tmp_path / "config.json").write_text("{}")
    assert budget_check([str(tmp_path)]) == 2
    assert "budget: no target set" in capsys.readouterr().err


def test_budget_check_parses_extra_layouts():
    from benchmarks.budget_check import parse_layout

    assert parse_layout("10,10,8,8,12,0", 6, 12) == [10, 10, 8, 8, 12, 0]
    for bad in ("10,10", "13,0,0,0,0,0", "a,b,c,d,e,f", "-1,0,0,0,0,0"):
        with pytest.raises(ValueError, match="--also"):
            parse_layout(bad, 6, 12)


# --- heads and feed-forward blocks under one budget (budget.ffn) -----------------------------------


def _ffn_points(cost, key="p50_ms"):
    """Cost points of MiniLM's FFN layouts (6 x 12 heads, 6 x 24 blocks) from ``cost(heads, blocks)``."""
    from pipeline.budget import default_block_grid, ffn_cost_layouts

    layouts = ffn_cost_layouts(default_grid(6, 12), default_block_grid(6, 24), 6, 12, 24)
    return [{**item, key: cost(item["keep"], item["ffn_blocks"])} for item in layouts]


def test_ffn_layouts_remove_heads_blocks_and_both():
    from pipeline.budget import default_block_grid, ffn_cost_layouts

    assert default_block_grid(6, 24) == (144, 108, 72, 36, 0)
    layouts = ffn_cost_layouts(default_grid(6, 12), default_block_grid(6, 24), 6, 12, 24)
    shapes = [(item["name"], item["keep"], item["ffn_blocks"]) for item in layouts]
    # The head layouts of the heads-only plan, every block kept ...
    assert [s for s in shapes if s[2] == 144] == [(item["name"], item["keep"], 144) for item in cost_layouts(
        default_grid(6, 12), 6, 12)]
    # ... blocks removed with every head kept, and both removed together down to nothing kept.
    assert [s for s in shapes if s[2] < 144] == [
        ("k72-b108", 72, 108), ("k72-b72", 72, 72), ("k72-b36", 72, 36), ("k72-b0", 72, 0),
        ("k54-b108", 54, 108), ("k36-b72", 36, 72), ("k18-b36", 18, 36), ("k0-b0", 0, 0)]
    both = next(item for item in layouts if item["name"] == "k18-b36")
    assert both["layout"] == [3] * 6 and both["blocks"] == [6] * 6 and both["empty_layers"] == 0


def test_fit_recovers_known_head_and_block_costs():
    from pipeline.budget import FFN_FEATURE_SETS

    fit, fits, reason = fit_cost_model(_ffn_points(lambda h, b: 2.0 + 0.05 * h + 0.03 * b), "p50_ms",
                                       FFN_FEATURE_SETS)
    assert fit.terms == ("intercept", "heads", "ffn_blocks") and reason.startswith("heads and blocks alone")
    assert fit.coefficients == pytest.approx((2.0, 0.05, 0.03)) and fit.max_rel_error < 1e-9
    assert len(fits) == 2


def test_unit_planner_gives_the_cost_budget_within_the_margin():
    from pipeline.budget import plan_units, unreachable_units_message

    fit = CostFit(("intercept", "heads", "ffn_blocks"), (2.0, 0.05, 0.03), 0.0, 0.0, None, 16)
    # 6 ms with 5%: heads and blocks may cost 6 / 1.05 - 2 = 3.714 ms of the 3.6 + 4.32 they cost in all.
    plan = plan_units(fit, resolve_target("latency_ms", 6.0, percentile="p50", batch=1), num_layers=6,
                      heads_per_layer=12, blocks_per_layer=24, margin=0.05)
    assert plan.reachable and plan.budget_ms == pytest.approx(6 / 1.05 - 2)
    assert plan.predicted_ms * 1.05 == pytest.approx(6.0) and plan.all_ms == pytest.approx(9.92)
    assert plan.heads_with_all_blocks() == 0 and plan.blocks_with_all_heads() == 3  # 0.114 ms / 0.03
    # A budget above the unpruned model keeps everything; an empty layer that saves time is not counted on.
    saving = CostFit(fit.terms + ("empty_layers",), (2.0, 0.05, 0.03, -0.1), 0.0, 0.0, None, 16)
    loose = plan_units(saving, resolve_target("latency_ms", 50.0, percentile="p50", batch=1), num_layers=6,
                       heads_per_layer=12, blocks_per_layer=24, margin=0.05)
    assert loose.budget_ms == pytest.approx(7.92) and loose.heads_with_all_blocks() == 72
    # Below one block kept (2 + 0.03 = 2.03 ms), the plan refuses, naming the fastest measurement.
    target = resolve_target("latency_ms", 2.1, percentile="p50", batch=1)
    tight = plan_units(fit, target, num_layers=6, heads_per_layer=12, blocks_per_layer=24, margin=0.05)
    assert not tight.reachable and tight.smallest_ms == pytest.approx(2.03)
    assert unreachable_units_message(target, tight, 0.05, fastest_measured_ms=2.0, setting="here") == (
        "budget.latency_ms: 2.1 ms (p50 <= 2.100 ms) is out of reach on this machine: one head or feed-forward block "
        "kept is predicted at 2.030 ms (2.131 ms with the 5% margin); with every head and block removed it "
        "measured 2.000 ms (here)")
    # A table where removing blocks saved nothing: blocks cost nothing, so all of them fit beside every head.
    noisy = CostFit(fit.terms, (2.0, 0.05, -0.001), 0.0, 0.0, None, 16)
    free = plan_units(noisy, resolve_target("latency_ms", 6.0, percentile="p50", batch=1), num_layers=6,
                      heads_per_layer=12, blocks_per_layer=24, margin=0.05)
    assert free.free == ("ffn_blocks",) and free.block_ms == 0.0 and free.blocks_with_all_heads() == 144
    assert free.heads_with_all_blocks() == 72 and free.smallest_ms == 2.0  # 3.714 ms buys 74 heads


def test_plan_command_with_blocks_prints_the_cost_budget_and_sets_the_unit_costs(tmp_path):
    from pipeline.budget import boundary_mixes, default_block_grid, ffn_cost_layouts, plan_units, point_features
    from pipeline.stages.plan import measurement_key

    run_dir = tmp_path / "run"
    overrides = ["budget.ffn=true", "budget.margin=0.05", "budget.latency_fraction=null", "budget.latency_ms=6"]
    cfg = load_config(BUDGET_CONFIG, [f"run_dir={run_dir}", *overrides])
    layouts = ffn_cost_layouts(default_grid(6, 12), default_block_grid(6, 24), 6, 12, 24)
    points = [{**p, "p90_ms": p["p50_ms"], "p99_ms": p["p50_ms"], "mean_ms": p["p50_ms"],
               "throughput_per_s": 1000 / p["p50_ms"], "rounds_p50_ms": [p["p50_ms"]], "spread": 1.0,
               "load_avg": [0.1, 0.1, 0.1]} for p in _ffn_points(lambda h, b: 2.0 + 0.05 * h + 0.03 * b)]
    # The mixes spending the fit's first budget (3.714 ms), timed 4% and 5% slower than the fit says.
    fit = CostFit(("intercept", "heads", "ffn_blocks"), (2.0, 0.05, 0.03), 0.0, 0.0, None, 16)
    first = plan_units(fit, resolve_target("latency_ms", 6.0, percentile="p50", batch=1), num_layers=6,
                       heads_per_layer=12, blocks_per_layer=24, margin=0.05)
    mixes = boundary_mixes(first, 6, 12, 24)
    assert [(m["keep"], m["ffn_blocks"]) for m in mixes] == [(55, 32), (37, 62), (18, 93)]
    near = [{**m, "p50_ms": (1.04 + 0.005 * i) * fit.predict(point_features(m))} for i, m in enumerate(mixes)]
    unpruned = {"name": "unpruned", "layout": [12] * 6, "blocks": [24] * 6, "keep": 72, "ffn_blocks": 144,
                "empty_layers": 0, "p50_ms": 9.92}
    boundary = {"layouts": [[m["layout"], m["blocks"]] for m in mixes], "measured": "2026-05-09T12:05:00+00:00",
                "points": [{**p, "p90_ms": p["p50_ms"], "p99_ms": p["p50_ms"], "mean_ms": p["p50_ms"],
                            "rounds_p50_ms": [p["p50_ms"]]} for p in (unpruned, *near)]}
    _write(run_dir / "plan" / "costs.json", {"key": measurement_key(cfg, layouts, 2),
                                             "measured": "2026-05-09T12:00:00+00:00",
                                             "machine": {"cores": 2, "load_avg": [0.1, 0.1, 0.1]}, "points": points,
                                             "boundary": boundary})
    args = ("plan", "-c", str(BUDGET_CONFIG), "--set", f"run_dir={run_dir}", *sum((["--set", o] for o in overrides), []))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "    0 heads,   0 blocks, 6 empty layer(s): p50 2.000 ms" in out
    assert "    37 heads,  62 blocks: 5.967 ms against 5.710 ms (1.045)" in out
    assert "  the plan takes the fit x 1.050, the largest ratio" in out
    # 6 / 1.05 / 1.05 - 2 = 3.442 ms for heads and blocks; predicted 1.05 x 5.442 = 5.714 ms.
    assert ("Planned: heads and feed-forward blocks (64 neurons) may cost 3.442 ms of the 7.920 ms all 72 heads and "
            "144 blocks cost (0.0500 ms per head, 0.0300 ms per block, 2.000 ms fixed, x 1.050): predicted p50 5.714 ms "
            "(6.000 ms with the margin) against 6.000 ms") in out
    assert "for example every block and 0 heads, or every head and 0 blocks" in out
    ffn = json.loads((run_dir / "config.json").read_text())["prune"]["ffn"]
    assert ffn["head_cost"] == pytest.approx(0.05) and ffn["block_cost"] == pytest.approx(0.03)
    assert ffn["cost_budget"] == pytest.approx(6 / 1.05 / 1.05 - 2)
    assert json.loads((run_dir / "plan" / "costs.json").read_text())["boundary"]["measured"] == "2026-05-09T12:05:00+00:00"

    refused = run_cli(*args[:-1], "budget.latency_ms=2.02")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "dsprune: error: budget.latency_ms: 2.02 ms (p50 <= 2.020 ms) is out of reach on this machine: one head or "
        "feed-forward block kept is predicted at 2.030 ms")


@pytest.mark.integration
def test_run_with_a_budget_of_heads_and_blocks_plans_unit_costs_and_checks_them(tmp_path, tokenizer):
    """dsprune run with budget.ffn on the tiny model: a real cost table with blocks removed, the fitted
    unit costs handed to joint DSP, the pruned model within its cost budget, the report's budget section."""
    config, run_dir = _tiny_budget_config(tmp_path, tokenizer, engines="onnx-int8",
                                          extra="prune: {ffn: {block_size: 32}}\n", budget_extra=", ffn: true")
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    costs = json.loads((run_dir / "plan" / "costs.json").read_text())
    # 8 heads and 8 blocks of 32 neurons: heads removed, blocks removed, both, down to nothing kept.
    assert [(p["keep"], p["ffn_blocks"]) for p in costs["points"]] == [
        (8, 8), (6, 8), (4, 8), (4, 8), (2, 8), (2, 8), (0, 8), (8, 6), (8, 4), (8, 2), (8, 0),
        (6, 6), (4, 4), (2, 2), (0, 0)]
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    ffn = json.loads((run_dir / "config.json").read_text())["prune"]["ffn"]
    assert plan["units"]["budget_ms"] == ffn["cost_budget"] and plan["units"]["head_ms"] == ffn["head_cost"]
    assert "[plan] prune.ffn.cost_budget = " in result.stderr
    mask = json.loads((run_dir / "harden" / "mask.json").read_text())
    heads, blocks = sum(map(len, mask["kept_heads"].values())), sum(map(sum, mask["ffn"]["mask"]))
    assert heads * ffn["head_cost"] + blocks * ffn["block_cost"] <= ffn["cost_budget"] * (1 + 1e-9)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    budget = report["budget"]
    assert budget["planned_keep"] is None and budget["units"]["budget_ms"] == ffn["cost_budget"]
    assert budget["measured"]["keep"] == heads and budget["measured"]["blocks"] == blocks
    assert budget["gate"]["passed"] and all("blocks_per_layer" in p for p in budget["cost_model"]["points"])
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "ms of heads and feed-forward blocks** (" in markdown and "| Blocks per layer |" in markdown
    assert (run_dir / "report" / "budget.png").stat().st_size > 0

    from benchmarks.budget_check import main as budget_check

    assert budget_check([str(run_dir), "--out", str(tmp_path / "check.json")]) == 0  # everything kept, and it meets
    checked = json.loads((tmp_path / "check.json").read_text())["layouts"]
    assert checked["planned"]["keep"] == heads and sum(checked["planned"]["blocks"]) == blocks


def test_budget_check_grows_a_mask_of_heads_and_blocks_by_their_joint_ranking():
    from benchmarks.budget_check import units_to_check

    logits = [[1e6 + 1, 3.0], [2.0, 1e6 + 2]]  # 2 layers x 2 heads
    ffn_logits = [[1e6, 5.0, -1.0], [4.0, 1e6 + 3, 0.0]]  # 2 layers x 3 blocks, same scale
    ffn_mask = [[1, 0, 0], [0, 1, 0]]
    units = units_to_check(logits, {"0": [0], "1": [1]}, ffn_logits, ffn_mask, step=3)
    # outside the mask, best first: block (0, 1) at 5.0, block (1, 0) at 4.0, head (0, 1) at 3.0
    assert units == {"unpruned": {"layout": [2, 2], "blocks": [3, 3]},
                     "planned": {"layout": [1, 1], "blocks": [1, 1]},
                     "planned+step": {"layout": [2, 1], "blocks": [2, 2]}}
