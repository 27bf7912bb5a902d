"""Stage plan: a latency budget becomes a head count, from a cost table measured on this machine.

Runs only when the config sets a ``budget`` target. It times pruned layouts of the model with the
budget's engine, batch and sequence length (:mod:`benchmarks.cost_table`), fits latency against
the heads kept (and the layers emptied, where that predicts better; :mod:`pipeline.budget`), and
plans the largest K predicted to meet the target with ``budget.margin`` to spare. ``run_pipeline``
then trains with exactly that K (it becomes ``prune.keep``) or, when no K is predicted to meet the
target, refuses before any training (exit 2) with the fastest latency the model reaches here.

With ``budget.ffn`` the layouts remove feed-forward blocks too, the fit gains a per-block term, and
the plan is a cost budget rather than a K: milliseconds per head and per block and what the kept
ones may cost (``prune.ffn.head_cost``, ``block_cost`` and ``cost_budget`` of the planned config);
joint DSP decides which heads and blocks stay.

Outputs: ``costs.json`` (the measured table, the machine and load, and the key of what was
measured) and ``plan.json`` (the target, the fits and their errors, K, the predicted curve, and the
study's metric range at K when ``budget.study`` names one).

Measuring takes minutes, planning milliseconds: when the previous ``plan/costs.json`` of the run
folder was measured with the same key (model, engine, shape, threads, timing settings, layouts),
it is reused rather than measured again, so trying other targets in one run folder is cheap;
``dsprune run --force`` and ``dsprune plan --force`` measure again.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

from pipeline import budget as planner
from pipeline.config import RunConfig
from pipeline.files import write_json_atomic

COSTS = "costs.json"
PLAN = "plan.json"


def _model_shape(cfg: RunConfig) -> tuple[int, int, int | None, int | None]:
    """(layers, heads per layer, max positions, feed-forward blocks per layer or None without budget.ffn)."""
    from transformers import AutoConfig

    from pipeline.architectures import adapter_for
    from pipeline.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    adapter_for(config)
    blocks = None
    if cfg.budget.ffn:
        width, size = config.intermediate_size, cfg.prune.ffn.block_size
        if width % size:
            raise ValueError(f"prune.ffn.block_size: {size} does not divide the model's feed-forward width {width}")
        blocks = width // size
    return (config.num_hidden_layers, config.num_attention_heads, getattr(config, "max_position_embeddings", None),
            blocks)


def _graph(cfg: RunConfig) -> str:
    from pipeline.stages.quantize import graph_for

    engine = cfg.budget.engine
    if engine == "torch-fp32":
        return "torch"
    return graph_for("int8-dynamic" if engine == "onnx-int8" else "fp32", cfg.quantize.optimize)


def measurement_key(cfg: RunConfig, layouts: list[dict], num_labels: int) -> dict:
    """Everything the measured latencies depend on; a cached table is reused only when this matches."""
    from pipeline.run import versions

    b, budget = cfg.bench, cfg.budget
    ffn = {"blocks": [item["blocks"] for item in layouts], "block_size": cfg.prune.ffn.block_size} if budget.ffn else {}
    return {
        **ffn,
        "model": cfg.model.name, "attn_implementation": cfg.model.attn_implementation, "num_labels": num_labels,
        "engine": budget.engine, "device": budget.device, "graph": _graph(cfg), "opset": cfg.export.opset,
        "batch": budget.batch, "seq": budget.seq, "threads": b.threads,
        "warmup": b.warmup, "runs": b.runs, "min_seconds": b.min_seconds, "rounds": b.rounds,
        "aggregate": b.aggregate,
        "layouts": [item["layout"] for item in layouts],
        "versions": {k: v for k, v in versions().items() if k in ("dsprune", "torch", "onnxruntime", "onnx")},
    }


def setting(cfg: RunConfig) -> str:
    budget = cfg.budget
    return (f"{budget.engine} on {budget.device}, batch {budget.batch}, seq {budget.seq}, "
            f"{cfg.bench.threads} threads")


def _unpruned_point(points: list[dict], total: int) -> dict | None:
    """The layout that keeps every head (and every block, when blocks were timed)."""
    full = [p for p in points if p["keep"] == total]
    return max(full, key=lambda p: p.get("ffn_blocks", 0), default=None)


def make_plan(cfg: RunConfig, costs: dict, num_layers: int, heads_per_layer: int,
              blocks_per_layer: int | None = None) -> dict:
    """plan.json from a cost table: target, fits, the planned K (or cost budget), the curve and the study's range."""
    budget = cfg.budget
    total = num_layers * heads_per_layer
    field_name = budget.target_fields[0]
    unpruned = _unpruned_point(costs["points"], total)
    target = planner.resolve_target(field_name, getattr(budget, field_name), percentile=budget.percentile,
                                      batch=budget.batch, unpruned_ms=unpruned)
    points = fitted_points(costs["points"], target, unpruned)
    if blocks_per_layer is not None:
        return _make_unit_plan(cfg, costs, points, target, num_layers, heads_per_layer, blocks_per_layer, unpruned)
    fit, fits, reason = planner.fit_cost_model(points, target.statistic)
    plan = planner.plan_heads(fit, target, num_layers=num_layers, heads_per_layer=heads_per_layer,
                                margin=budget.margin, per_layer=cfg.prune.per_layer)
    fastest = min((p[target.statistic] for p in costs["points"] if p["keep"] == 0), default=None)
    message = None
    if not plan.reachable:
        message = planner.unreachable_message(target, plan, budget.margin, fastest_measured_ms=fastest,
                                                setting=setting(cfg))
    expected = None
    if plan.reachable and budget.study:
        rows = planner.read_study_rows(budget.study)
        expected = planner.expected_metric(rows, variant=planner.study_variant(cfg.prune.method, cfg.prune.mode),
                                             task=cfg.data.task.lower().replace("-", ""), keep=plan.keep)
        if expected is not None:
            expected["study"] = budget.study
    return {
        **_plan_record(cfg, costs, target, points, (fit, fits, reason), plan, unpruned, fastest, message),
        "model": {"num_layers": num_layers, "heads_per_layer": heads_per_layer, "heads_total": total,
                  "per_layer": cfg.prune.per_layer},
        "keep": plan.keep,
        "smallest_keep": plan.smallest_keep,
        "curve": plan.curve,
        "expected_metric": expected,
    }


def _plan_record(cfg: RunConfig, costs: dict, target, points: list[dict], fitted: tuple, plan,
                 unpruned: dict | None, fastest: float | None, message: str | None, extra_warnings=()) -> dict:
    """The fields of plan.json that a plan of heads and a plan of heads and blocks share."""
    budget = cfg.budget
    fit, fits, reason = fitted
    warnings = planner.measurement_warnings(points, cores=costs["machine"]["cores"], threads=cfg.bench.threads,
                                            fit=fit, margin=budget.margin)
    return {
        "target": {**dataclasses.asdict(target), "engine": budget.engine, "device": budget.device,
                   "seq": budget.seq, "threads": cfg.bench.threads, "percentile": budget.percentile,
                   "margin": budget.margin, "description": target.describe()},
        "statistic": target.statistic,
        "paired": "paired_fraction" in points[0],
        "points": points,
        "fit": fit.to_dict(),
        "fit_choice": reason,
        "fits": [f.to_dict() for f in fits],
        "reachable": plan.reachable,
        "predicted_ms": plan.predicted_ms,
        "predicted_with_margin_ms": None if plan.predicted_ms is None else plan.predicted_ms * (1 + budget.margin),
        "smallest_ms": plan.smallest_ms,
        "fastest_measured_ms": fastest,
        "unpruned_measured_ms": unpruned[target.statistic] if unpruned else None,
        "message": message,
        "warnings": [*warnings, *extra_warnings],
    }


def _layout_pairs(items: list[dict]) -> list[list[list[int]]]:
    return [[list(item["layout"]), list(item["blocks"])] for item in items]


def fitted_points(points: list[dict], target, unpruned: dict | None) -> list[dict]:
    """The cost points the fit sees: as measured, or for a ``latency_fraction`` budget on p50 each
    layout's paired fraction of the unpruned model times the unpruned p50 (:func:`pipeline.budget.paired_points`)."""
    if target.field == "latency_fraction" and target.statistic == "p50_ms" and unpruned is not None:
        return planner.paired_points(points, unpruned) or points
    return points


def _make_unit_plan(cfg: RunConfig, costs: dict, points: list[dict], target, num_layers: int, heads_per_layer: int,
                    blocks_per_layer: int, unpruned: dict | None) -> dict:
    """plan.json when heads and feed-forward blocks share the budget (``budget.ffn``)."""
    budget = cfg.budget
    fit, fits, reason = planner.fit_cost_model(points, target.statistic, planner.FFN_FEATURE_SETS)
    shape = {"num_layers": num_layers, "heads_per_layer": heads_per_layer, "blocks_per_layer": blocks_per_layer}
    plan = planner.plan_units(fit, target, margin=budget.margin, **shape)
    calibration = None
    if plan.reachable:
        # Time mixes that spend this budget, then plan again with the fit corrected by what they measured.
        mixes = planner.boundary_mixes(plan, num_layers, heads_per_layer, blocks_per_layer)
        timed = costs.get("boundary")
        calibration = {"pending": mixes, "first_budget_ms": plan.budget_ms}
        if timed and timed["layouts"] == _layout_pairs(mixes):
            near = [p for p in timed["points"] if p["name"] != "unpruned"]
            anchor = next(p for p in timed["points"] if p["name"] == "unpruned")
            if target.field == "latency_fraction" and target.statistic == "p50_ms" and unpruned is not None:
                # Fractions of the unpruned model timed in the same rounds, on the cost table's anchor.
                near = planner.paired_points(near, {**anchor, "p50_ms": unpruned["p50_ms"]}) or near
            correction = planner.boundary_correction(fit, near, target.statistic)
            plan = planner.plan_units(fit, target, margin=budget.margin, correction=correction, **shape)
            calibration = {
                "first_budget_ms": calibration["first_budget_ms"], "correction": correction,
                "measured": timed["measured"],
                "points": [{"name": p["name"], "keep": p["keep"], "blocks": p["ffn_blocks"],
                            "value_ms": p[target.statistic], "fitted_ms": fit.predict(planner.point_features(p)),
                            "ratio": p[target.statistic] / fit.predict(planner.point_features(p))} for p in near],
            }
    fastest = min(p[target.statistic] for p in costs["points"])
    message = None
    if not plan.reachable:
        message = planner.unreachable_units_message(target, plan, budget.margin, fastest_measured_ms=fastest,
                                                    setting=setting(cfg))
    fitted = dict(zip(fit.terms, fit.coefficients))
    free = [f"removing {kind.replace('ffn_', 'feed-forward ')} did not save time in the cost table (fitted "
            f"{fitted[kind]:+.4f} ms each): the plan charges them nothing" for kind in plan.free]
    units = {"head_ms": plan.head_ms, "block_ms": plan.block_ms, "fixed_ms": plan.fixed_ms,
             "budget_ms": plan.budget_ms, "all_ms": plan.all_ms, "block_size": cfg.prune.ffn.block_size,
             "correction": plan.correction, "calibration": calibration}
    if plan.reachable:
        units |= {"heads_with_all_blocks": plan.heads_with_all_blocks(),
                  "blocks_with_all_heads": plan.blocks_with_all_heads()}
    return {
        **_plan_record(cfg, costs, target, points, (fit, fits, reason), plan, unpruned, fastest, message, free),
        "model": {"num_layers": num_layers, "heads_per_layer": heads_per_layer,
                  "heads_total": num_layers * heads_per_layer, "per_layer": False,
                  "blocks_per_layer": blocks_per_layer, "blocks_total": num_layers * blocks_per_layer},
        "keep": None,
        "units": units,
        "smallest_keep": None,
        "curve": [],
        "expected_metric": None,
    }


def _check(cfg: RunConfig, num_layers: int, heads_per_layer: int, max_positions: int | None) -> tuple[int, ...]:
    budget = cfg.budget
    if not budget.active:
        raise ValueError("budget: no target set; set budget.latency_ms, budget.latency_fraction or "
                         "budget.throughput_per_s")
    if budget.study and not Path(budget.study).is_file():  # checked before minutes of timing
        raise ValueError(f"budget.study: {budget.study!r} is not a file (a benchmarks/results/study-*.json)")
    if max_positions is not None and budget.seq > max_positions:
        raise ValueError(f"budget.seq: {budget.seq} exceeds the model's max_position_embeddings ({max_positions})")
    total = num_layers * heads_per_layer
    grid = budget.grid or planner.default_grid(num_layers, heads_per_layer)
    too_many = [k for k in grid if k > total]
    if too_many:
        raise ValueError(f"budget.grid: {too_many} exceed the model's {total} heads ({num_layers} x {heads_per_layer})")
    # The unpruned point anchors latency_fraction; two head counts at least make a line.
    grid = tuple(sorted({total, *grid}, reverse=True))
    if len(grid) < 2:
        raise ValueError(f"budget.grid: {list(budget.grid)} gives one head count; list at least one below {total}")
    return grid


def _check_blocks(cfg: RunConfig, num_layers: int, blocks_per_layer: int) -> tuple[int, ...]:
    total = num_layers * blocks_per_layer
    grid = cfg.budget.block_grid or planner.default_block_grid(num_layers, blocks_per_layer)
    too_many = [k for k in grid if k > total]
    if too_many:
        raise ValueError(f"budget.block_grid: {too_many} exceed the model's {total} feed-forward blocks "
                         f"({num_layers} x {blocks_per_layer} of {cfg.prune.ffn.block_size} neurons)")
    grid = tuple(sorted({total, *grid}, reverse=True))
    if len(grid) < 2:
        raise ValueError(f"budget.block_grid: {list(cfg.budget.block_grid)} gives one block count; list at least one "
                         f"below {total}")
    return grid


def run(cfg: RunConfig, run_dir, out):
    from pipeline.evaluation import task_spec

    run_dir, out = Path(run_dir), Path(out)
    num_layers, heads_per_layer, max_positions, blocks_per_layer = _model_shape(cfg)
    grid = _check(cfg, num_layers, heads_per_layer, max_positions)
    if blocks_per_layer is None:
        layouts = planner.cost_layouts(grid, num_layers, heads_per_layer)
    else:
        block_grid = _check_blocks(cfg, num_layers, blocks_per_layer)
        layouts = planner.ffn_cost_layouts(grid, block_grid, num_layers, heads_per_layer, blocks_per_layer)
    task = task_spec(cfg)
    num_labels = task.num_labels
    key = measurement_key(cfg, layouts, num_labels)

    previous = run_dir / "plan" / COSTS
    costs = json.loads(previous.read_text()) if previous.is_file() else None
    reused = costs is not None and costs.get("key") == key
    if not reused:
        started = datetime.now(timezone.utc)
        costs = {"key": key, "measured": started.isoformat(timespec="seconds"), **time_layouts(cfg, layouts, task)}
    plan = make_plan(cfg, costs, num_layers, heads_per_layer, blocks_per_layer)
    pending = (plan.get("units", {}).get("calibration") or {}).get("pending")
    if pending:
        costs = {**costs, "boundary": _time_boundary(cfg, costs, pending, task)}
        plan = make_plan(cfg, costs, num_layers, heads_per_layer, blocks_per_layer)
    write_json_atomic(out / COSTS, costs)
    write_json_atomic(out / PLAN, plan)
    return {"cost_table": "reused" if reused else "measured", "keep": plan["keep"],
            "cost_budget_ms": plan.get("units", {}).get("budget_ms"), "reachable": plan["reachable"],
            "predicted_ms": plan["predicted_ms"], "fit_max_rel_error": plan["fit"]["max_rel_error"]}


def time_layouts(cfg: RunConfig, items: list[dict], task) -> dict:
    """Cut ``items`` (layouts) from the config's model and time them all, interleaved, with the budget's
    engine, batch and sequence length and the bench settings (:func:`benchmarks.cost_table.measure_cost_table`)."""
    from benchmarks.cost_table import measure_cost_table
    from pipeline.models import load_classifier

    model = load_classifier(cfg.model, task.num_labels, task.label_names)
    b, budget, graph = cfg.bench, cfg.budget, _graph(cfg)
    return measure_cost_table(model, items, engine=budget.engine, batch=budget.batch, seq=budget.seq,
                              threads=b.threads, warmup=b.warmup, runs=b.runs, min_seconds=b.min_seconds,
                              rounds=b.rounds, aggregate=b.aggregate, opset=cfg.export.opset,
                              graph="plain" if graph == "torch" else graph, block_size=cfg.prune.ffn.block_size)


def _time_boundary(cfg: RunConfig, costs: dict, mixes: list[dict], task) -> dict:
    """Time the unpruned layout and ``mixes`` (the plan's budget spent different ways) in one interleaved session."""
    started = datetime.now(timezone.utc)
    unpruned = max(costs["points"], key=lambda p: (p["keep"], p.get("ffn_blocks", 0)))
    items = [{**{k: unpruned[k] for k in ("layout", "blocks", "keep", "empty_layers", "ffn_blocks")},
              "name": "unpruned"}, *mixes]
    return {"layouts": _layout_pairs(mixes), "measured": started.isoformat(timespec="seconds"),
            **time_layouts(cfg, items, task)}


def read_plan(run_dir) -> dict:
    return json.loads((Path(run_dir) / "plan" / PLAN).read_text())


def read_costs(run_dir) -> dict:
    return json.loads((Path(run_dir) / "plan" / COSTS).read_text())


def planned_config(cfg: RunConfig, run_dir) -> RunConfig:
    """``cfg`` with the planned K as ``prune.keep`` (or, with ``budget.ffn``, the planned cost budget as
    ``prune.ffn.head_cost``, ``block_cost`` and ``cost_budget``).

    Raises:
        BudgetUnreachable: no allowed K is predicted to meet the budget (one line; exit 2).
    """
    plan = read_plan(run_dir)
    if not plan["reachable"]:
        raise planner.BudgetUnreachable(plan["message"])
    if "units" in plan:
        units = plan["units"]
        ffn = dataclasses.replace(cfg.prune.ffn, head_cost=units["head_ms"], block_cost=units["block_ms"],
                                  cost_budget=units["budget_ms"])
        # keep bounds nothing here (the cost budget decides how many heads stay): every head may.
        return dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, ffn=ffn,
                                                                  keep=int(plan["model"]["heads_total"])))
    return dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, keep=int(plan["keep"])))


def describe(plan: dict, costs: dict, *, curve_step: int | None = None) -> list[str]:
    """Lines for people: the target, the cost table and its fit, K, the predicted curve, the study's range."""
    target, fit, statistic = plan["target"], plan["fit"], plan["statistic"]
    name = statistic.removesuffix("_ms")
    margin = target["margin"]
    load = costs["machine"]["load_avg"]
    lines = [
        f"Budget: {target['description']} ({target['engine']} on {target['device']}, batch {target['batch']}, "
        f"seq {target['seq']}, {target['threads']} threads); margin {margin:.0%}",
        f"Cost table: {len(costs['points'])} layouts measured {costs['measured']}, load average "
        f"{' / '.join(f'{x:.2f}' for x in load)} on {costs['machine']['cores']} cores",
    ]
    points = plan.get("points", costs["points"])
    if plan.get("paired"):
        lines.append(f"  {name} as fitted: each layout's fraction of the unpruned model (the median over rounds of "
                     f"the two timed in the same round) times the unpruned model's {name}")
    for p in points:
        blocks = f", {p['ffn_blocks']:>3} blocks" if "ffn_blocks" in p else ""
        paired = (f" = {p['paired_fraction']:.3f} x unpruned; fastest round {p['best_p50_ms']:.3f} ms"
                  if "paired_fraction" in p else "")
        lines.append(f"  {p['keep']:>4} heads{blocks}, {p['empty_layers']} empty layer(s): {name} {p[statistic]:.3f} ms"
                     f"{paired} (spread {p['spread']:.2f}, load {p['load_avg'][0]:.2f})")
    chosen = planner.CostFit.from_dict(fit)
    loo = fit["loo_rms_rel_error"]
    lines.append(f"Fit: {name} = {chosen.formula()}; max error {fit['max_rel_error']:.1%}, "
                 f"RMS {fit['rms_rel_error']:.1%}" + (f", leave-one-out {loo:.1%}" if loo is not None else "") + f" ({plan['fit_choice']})")
    lines += [f"Warning: {w}" for w in plan.get("warnings", [])]
    if "units" in plan:
        return lines + _describe_units(plan)
    if plan["reachable"]:
        lines.append(f"Planned: keep {plan['keep']} of {plan['model']['heads_total']} heads, predicted {name} "
                     f"{plan['predicted_ms']:.3f} ms ({plan['predicted_with_margin_ms']:.3f} ms with the margin) "
                     f"against {target['latency_ms']:.3f} ms")
    else:
        lines.append(f"Refused: {plan['message']}")
    total = plan["model"]["heads_total"]
    step = curve_step or max(1, total // 12)
    shown = [p for p in plan["curve"] if p["keep"] % step == 0 or p["keep"] == plan["keep"]]
    measured = {}
    for p in points:
        if p["keep"] not in measured or p["empty_layers"] < measured[p["keep"]][0]:
            measured[p["keep"]] = (p["empty_layers"], p[statistic])
    lines.append(f"Predicted {name} by heads kept (worst case over the layers a mask may empty; best case beside):")
    for p in shown:
        mark = "  <- planned" if p["keep"] == plan["keep"] else ""
        seen = f"  measured {measured[p['keep']][1]:.3f}" if p["keep"] in measured else ""
        ok = "meets" if p["predicted_ms"] * (1 + margin) <= target["latency_ms"] * (1 + 1e-9) else "misses"
        lines.append(f"  {p['keep']:>4}: {p['predicted_ms']:.3f} ms (best {p['best_ms']:.3f}) {ok}{seen}{mark}")
    expected = plan.get("expected_metric")
    if expected:
        keeps = " and ".join(str(k) for k in expected["keeps"])
        lines.append(f"Expected {expected['metric']} at {plan['keep']} heads ({expected['variant']}, study rows at K "
                     f"{keeps}, n={expected['n']}, {expected['study']}): mean {expected['mean']:.4f}, "
                     f"min {expected['min']:.4f}, max {expected['max']:.4f} (with the study's training recipe)")
    elif plan["reachable"]:
        lines.append("Expected metric: no study rows (set budget.study to a benchmarks/results/study-*.json)")
    return lines


def _describe_units(plan: dict) -> list[str]:
    """The plan of heads and feed-forward blocks under one budget, for people."""
    units, target, model = plan["units"], plan["target"], plan["model"]
    name = plan["statistic"].removesuffix("_ms")
    if not plan["reachable"]:
        return [f"Refused: {plan['message']}"]
    lines = []
    calibration = units.get("calibration") or {}
    if "correction" in calibration:
        lines.append(f"Calibration: mixes spending the fit's budget of {calibration['first_budget_ms']:.3f} ms, timed "
                     f"{calibration['measured']} beside the unpruned model, measured against fitted {name}:")
        lines += [f"  {p['keep']:>4} heads, {p['blocks']:>3} blocks: {p['value_ms']:.3f} ms against "
                  f"{p['fitted_ms']:.3f} ms ({p['ratio']:.3f})" for p in calibration["points"]]
        lines.append(f"  the plan takes the fit x {calibration['correction']:.3f}, the largest ratio")
    return lines + [
        f"Planned: heads and feed-forward blocks ({units['block_size']} neurons) may cost {units['budget_ms']:.3f} ms "
        f"of the {units['all_ms'] - units['fixed_ms']:.3f} ms all {model['heads_total']} heads and "
        f"{model['blocks_total']} blocks cost ({units['head_ms']:.4f} ms per head, {units['block_ms']:.4f} ms per "
        f"block, {units['fixed_ms']:.3f} ms fixed, x {units['correction']:.3f}): predicted {name} "
        f"{plan['predicted_ms']:.3f} ms "
        f"({plan['predicted_with_margin_ms']:.3f} ms with the margin) against {target['latency_ms']:.3f} ms",
        f"  for example every block and {units['heads_with_all_blocks']} heads, or every head and "
        f"{units['blocks_with_all_heads']} blocks; joint DSP decides the mix",
    ]
