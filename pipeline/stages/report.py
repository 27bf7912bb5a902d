"""Stage report: report.json (schema dsprune.report/1), report.md and plots, with the gates evaluated.

The report is written whatever the gates say; ``run_pipeline`` then fails the run (exit 1) on a crossed bound.
With a ``budget`` set, the report carries its cost model and the measured point, and the budget is
one of the gates: a pruned model slower than the budget fails the run with the measured figure.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.report import SCHEMA, speedups, write_report
from pipeline.config import RunConfig
from pipeline.run import versions
from pipeline.stages.bench import variant_files

STAGE_VARIANTS = (  # (stage label, variant name the metric belongs to)
    ("fine-tuned", "baseline/torch-fp32"),
    ("hardened", None),
    ("pruned", "pruned/torch-fp32"),
    ("onnx", "pruned/onnx-fp32"),
    ("int8", "pruned/onnx-int8"),
)


def _read(run_dir: Path, stage: str, name: str = "metrics.json") -> dict:
    return json.loads((run_dir / stage / name).read_text())


def build_report(cfg: RunConfig, run_dir: Path, *, created: str | None = None,
                 package_versions: dict[str, str] | None = None) -> dict:
    """The report dict of a run folder whose stages up to bench are complete.

    Args:
        cfg: the run's config.
        run_dir: the run folder.
        created: the report's ``created`` time; now (UTC) when None. Fixed by the golden test.
        package_versions: the report's ``versions``; the installed ones when None.
    """
    finetune = _read(run_dir, "finetune")
    mask = _read(run_dir, "harden", "mask.json")
    hardened = _read(run_dir, "harden")["hardened"]
    pruned = _read(run_dir, "prune")
    onnx = _read(run_dir, "export")["onnx-fp32"]
    quant = _read(run_dir, "quantize")
    machine = _read(run_dir, "bench", "machine.json")
    rows = [json.loads(line) for line in (run_dir / "bench" / "rows.jsonl").read_text().splitlines() if line]
    metric = finetune["metric"]

    metric_of = {
        "baseline/torch-fp32": finetune["baseline"], "pruned/torch-fp32": pruned["pruned"],
        "baseline/onnx-fp32": onnx["baseline"], "pruned/onnx-fp32": onnx["pruned"],
    }
    for preset, by_model in quant["metrics"].items():
        if preset != "int8-dynamic":  # the preset bench times as onnx-int8; quantize/metrics.json has the others
            continue
        precision = preset.split("-")[0]
        for model, values in by_model.items():
            metric_of[f"{model}/onnx-{precision}"] = values
    files = variant_files(cfg, run_dir)
    variants = []
    for name, (engine, path) in files.items():
        model, _, kind = name.partition("/")
        path = Path(path)
        variants.append({
            "name": name, "pruned": model == "pruned", "engine": engine, "precision": kind.split("-")[1],
            "device": "cpu", "metric": metric_of[name][metric],
            "params": pruned["params"][model], "flops_per_token": pruned["flops_per_token"][model]["128"],
            "file_bytes": path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors")),
            "latency": [
                {k: r[k] for k in ("batch", "seq", "threads", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s",
                                   "spread", "load_avg", "aggregate", "rounds", "median_p50_ms", "confirmed_rounds")
                 if k in r}
                for r in rows if r["variant"] == name
            ],
        })
    baseline_metric = finetune["baseline"][metric]
    stages = []
    for label, variant in STAGE_VARIANTS:
        value = hardened[metric] if variant is None else metric_of[variant][metric]
        stages.append({"stage": label, "variant": variant, "metric": value, "drop": baseline_metric - value})
    kept = {k: v for k, v in mask["kept_heads"].items()}
    config = json.loads((run_dir / "config.json").read_text())
    report = {
        "schema": SCHEMA,
        "model": {
            "name": config["model"]["name"], "heads_total": sum(len(r) for r in mask["mask"]),
            "heads_kept": sum(len(v) for v in kept.values()), "kept_heads": kept,
            "num_layers": len(mask["mask"]), "heads_per_layer": len(mask["mask"][0]),
        },
        "task": {"name": finetune["task"], "metric": metric, "eval_examples": finetune["eval_examples"]},
        "stages": stages,
        "variants": variants,
        "machine": machine,
        "versions": versions() if package_versions is None else package_versions,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
    }
    if "ffn" in mask:
        report["model"]["ffn"] = {
            "block_size": mask["ffn"]["block_size"],
            "neurons_total": len(mask["ffn"]["mask"]) * len(mask["ffn"]["mask"][0]) * mask["ffn"]["block_size"],
            "neurons_kept_per_layer": pruned["ffn_neurons_kept"],
            "layers_without_matmuls": pruned["layers_without_matmuls"],
            "flops_kept_fraction": pruned["flops_kept_fraction"]["fraction"],
            "flops_seq": pruned["flops_kept_fraction"]["seq"],
        }
    report["speedups"] = speedups(report)
    report["pruning_speedups"] = pruning_speedups(variants, pruned["flops_per_token"])
    if cfg.budget.active:
        report["budget"] = budget_section(cfg, run_dir, rows, kept, len(mask["mask"]), mask.get("ffn"))
    report["gates"] = evaluate_gates(cfg, report)
    return report


def budget_section(cfg: RunConfig, run_dir: Path, rows: list[dict], kept: dict, num_layers: int,
                   ffn_mask: dict | None = None) -> dict:
    """The budget, the cost model it was planned from, and the pruned model's measured point against it.

    The check reads the bench row of the budget's engine, batch and sequence length. A
    ``latency_fraction`` budget is checked as the pruned over the unpruned latency measured in the
    same interleaved bench session, so a machine busier than when the cost table was measured
    does not move the bound; on p50, as the median over rounds of the two timed in the same round,
    so a drift between rounds does not either (as the plan fitted it). With feed-forward blocks
    planned (``budget.ffn``), every point and the measured mask also carry their blocks per layer,
    and the plan its unit costs (``units``).
    """
    from pipeline.budget import CostFit, features, paired_fraction, point_features
    from pipeline.stages.plan import read_costs, read_plan

    plan, costs = read_plan(run_dir), read_costs(run_dir)
    b, target, statistic = cfg.budget, plan["target"], plan["statistic"]

    def bench_row(model: str) -> dict:
        name = f"{model}/{b.engine}"
        for row in rows:
            if row["variant"] == name and row["batch"] == b.batch and row["seq"] == b.seq:
                return row
        raise ValueError(f"bench/rows.jsonl: no {name} row at batch {b.batch}, seq {b.seq} to check the budget; "
                         "rerun the bench stage")

    pruned_row, baseline_row = bench_row("pruned"), bench_row("baseline")
    layout = [len(kept.get(str(layer), [])) for layer in range(num_layers)]
    units = plan.get("units")
    blocks = [int(sum(row)) for row in ffn_mask["mask"]] if units and ffn_mask else None
    shape = features(layout, blocks)
    value_ms, baseline_ms = pruned_row[statistic], baseline_row[statistic]
    # A fraction of the unpruned p50 is judged on pairs timed in the same round (pipeline.budget.paired_fraction).
    paired = (paired_fraction(pruned_row.get("rounds_p50_ms", []), baseline_row.get("rounds_p50_ms", []))
              if statistic == "p50_ms" else None)
    name = statistic.removesuffix("_ms")
    where = f"batch {b.batch}, seq {b.seq}"
    if target["field"] == "throughput_per_s":
        gate = {"name": f"budget.throughput_per_s (pruned/{b.engine} sequences/s, {where})",
                "value": pruned_row["throughput_per_s"], "bound": target["value"],
                "passed": pruned_row["throughput_per_s"] >= target["value"]}
    elif target["field"] == "latency_fraction":
        if paired is not None:
            ratio = paired
            how = f"median over rounds of pruned/{b.engine} {name} over baseline {name} timed in the same round"
        else:
            ratio = value_ms / baseline_ms
            how = f"pruned/{b.engine} {name} {value_ms:.3f} ms over baseline {baseline_ms:.3f} ms"
        gate = {"name": f"budget.latency_fraction ({how}, {where})",
                "value": ratio, "bound": target["value"], "passed": ratio <= target["value"]}
    else:
        gate = {"name": f"budget.latency_ms (pruned/{b.engine} {name} ms, {where})",
                "value": value_ms, "bound": target["value"], "passed": value_ms <= target["value"]}
    fit = CostFit.from_dict(plan["fit"])

    def with_blocks(entry: dict, per_layer) -> dict:
        return entry if per_layer is None else {**entry, "blocks": int(sum(per_layer)), "blocks_per_layer": per_layer}

    section = {
        "target": {k: target[k] for k in ("field", "value", "statistic", "latency_ms", "engine", "device", "batch",
                                          "seq", "threads", "margin", "percentile")},
        "cost_model": {
            "points": [with_blocks({"keep": p["keep"], "empty_layers": p["empty_layers"], "kept_per_layer": p["layout"],
                                    "value_ms": p[statistic], "fitted_ms": fit.predict(point_features(p)),
                                    "spread": p["spread"], "load_avg": p["load_avg"]}, p.get("blocks"))
                       for p in plan.get("points", costs["points"])],
            "fit": plan["fit"],
            "fit_choice": plan["fit_choice"],
            "fits": plan["fits"],
            "measured": costs["measured"],
            "machine": costs["machine"],
        },
        "planned_keep": plan["keep"],
        "predicted_ms": plan["predicted_ms"],
        "curve": plan["curve"],
        "expected_metric": plan["expected_metric"],
        "warnings": plan.get("warnings", []),
        "measured": with_blocks({
            "keep": int(shape["heads"]), "empty_layers": int(shape["empty_layers"]), "kept_per_layer": layout,
            "value_ms": value_ms, "predicted_ms": fit.predict(shape) * (units or {}).get("correction", 1.0),
            "baseline_ms": baseline_ms,
            "throughput_per_s": pruned_row["throughput_per_s"], "spread": pruned_row["spread"],
            "load_avg": pruned_row["load_avg"], "paired_fraction": paired,
        }, blocks),
        "gate": gate,
    }
    if units:
        section["units"] = units
    return section


def pruning_speedups(variants: list[dict], flops: dict) -> list[dict]:
    """Pruned against unpruned on the same engine and precision: measured p50 ratio beside the ideal.

    The ideal is the FLOP ratio from the real module shapes at that sequence length; efficiency is
    measured / ideal (1.0 means the engine turned every removed FLOP into time saved).
    """
    by_name = {v["name"]: v for v in variants}
    out = []
    for variant in variants:
        if not variant["pruned"]:
            continue
        kind = variant["name"].split("/", 1)[1]
        base = by_name.get(f"baseline/{kind}")
        if base is None:
            continue
        base_p50 = {(r["batch"], r["seq"]): r["p50_ms"] for r in base["latency"]}
        for row in variant["latency"]:
            key = (row["batch"], row["seq"])
            if key not in base_p50 or str(row["seq"]) not in flops["baseline"]:
                continue
            measured = base_p50[key] / row["p50_ms"]
            ideal = flops["baseline"][str(row["seq"])] / flops["pruned"][str(row["seq"])]
            out.append({"engine": variant["engine"], "precision": variant["precision"], "variant": variant["name"],
                        "batch": key[0], "seq": key[1], "measured": measured, "ideal": ideal,
                        "efficiency": measured / ideal})
    return out


def evaluate_gates(cfg: RunConfig, report: dict) -> list[dict]:
    gates = [report["budget"]["gate"]] if "budget" in report else []
    by_stage = {s["stage"]: s for s in report["stages"]}
    if cfg.gates.max_metric_drop is not None:
        drop = by_stage["int8"]["drop"]
        gates.append({"name": "max_metric_drop (pruned/onnx-int8 vs fine-tuned)", "value": drop,
                      "bound": cfg.gates.max_metric_drop, "passed": drop <= cfg.gates.max_metric_drop})
    if cfg.gates.min_speedup is not None:
        ratios = [s["p50_ratio"] for s in report["speedups"] if s["variant"] == "pruned/onnx-int8" and s["batch"] == 1]
        value = ratios[0] if ratios else 0.0
        gates.append({"name": "min_speedup (pruned/onnx-int8 vs baseline/torch-fp32, batch 1)", "value": value,
                      "bound": cfg.gates.min_speedup, "passed": value >= cfg.gates.min_speedup})
    return gates


def run(cfg: RunConfig, run_dir, out):
    report = build_report(cfg, Path(run_dir))
    write_report(report, out)
    return {"gates_failed": [g["name"] for g in report["gates"] if not g["passed"]]}
