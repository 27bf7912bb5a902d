"""Was the planned K the largest that meets the budget? Time K and K + step heads on this machine.

    python -m benchmarks.budget_check RUN_DIR [--step 6] [--also 10,10,10,10,10,10 ...] [--out FILE]

A run with a latency budget (``dsprune run -c`` with ``budget:``) trained exactly K heads. This
times three layouts with the budget's engine, batch and sequence length and the run's bench
settings, interleaved, each round in fresh processes: the unpruned model, the run's mask (its
heads per layer), and that mask plus the ``step`` next heads in the gates' ranking
(``finetune/gates.json``), i.e. what training with K + step would most likely have kept. As in the
plan stage, the pretrained weights stand in for the trained ones (latency does not depend on them).
A ``latency_fraction`` budget on p50 is judged, as in the bench stage, by the median over rounds of
each layout's p50 over the unpruned one's in the same round.

``--also`` adds layouts (heads per layer) to the same interleaved rounds, for example even layouts
of about K heads to compare an uneven trained mask with; they are reported, not judged.

K is "within one step of the largest K that meets the budget" when K meets it and K + step does
not; when K + step meets it too, the planner was too cautious by at least a step.

A run that planned feed-forward blocks too (``budget.ffn``) has no K: its mask is heads and blocks
within a cost budget. Then "planned" is that mask and "planned+step" adds the ``step`` next units
(heads or blocks) of the gates' joint ranking, i.e. what a cost budget a few units larger would
most likely have kept; each layout also keeps its blocks per layer. Prints one line
per layout and writes the JSON when ``--out`` is given. Exit 0 when K is within one step, 1 when
not (K misses, or K + step also meets), 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def layouts_to_check(logits: list[list[float]], kept: dict[str, list[int]], step: int) -> dict[str, list[int]]:
    """Heads per layer of the unpruned model, the kept mask, and the mask plus the ``step`` best-ranked
    heads outside it (ties keep the lower layer, then the lower head)."""
    num_layers, heads = len(logits), len(logits[0])
    mask = {(int(layer), h) for layer, hs in kept.items() for h in hs}
    outside = sorted(((-logits[layer][h], layer, h) for layer in range(num_layers) for h in range(heads)
                      if (layer, h) not in mask))
    grown = mask | {(layer, h) for _, layer, h in outside[:step]}

    def per_layer(heads_kept):
        return [sum(1 for layer, _ in heads_kept if layer == i) for i in range(num_layers)]

    return {"unpruned": [heads] * num_layers, "planned": per_layer(mask), "planned+step": per_layer(grown)}


def units_to_check(logits: list[list[float]], kept: dict[str, list[int]], ffn_logits: list[list[float]],
                   ffn_mask: list[list[int]], step: int) -> dict[str, dict[str, list[int]]]:
    """As :func:`layouts_to_check` for heads and feed-forward blocks ranked together (one scale of gate
    logits): ``{name: {"layout": heads per layer, "blocks": blocks per layer}}``; the grown mask adds
    the ``step`` best-ranked units outside it, heads or blocks."""
    num_layers, heads, blocks = len(logits), len(logits[0]), len(ffn_logits[0])
    mask = {(int(layer), h) for layer, hs in kept.items() for h in hs}
    mask |= {(layer, heads + b) for layer in range(num_layers) for b in range(blocks) if ffn_mask[layer][b]}
    scores = [list(logits[layer]) + list(ffn_logits[layer]) for layer in range(num_layers)]
    outside = sorted((-scores[layer][u], layer, u) for layer in range(num_layers) for u in range(heads + blocks)
                     if (layer, u) not in mask)
    grown = mask | {(layer, u) for _, layer, u in outside[:step]}

    def split(units):
        return {"layout": [sum(1 for layer, u in units if layer == i and u < heads) for i in range(num_layers)],
                "blocks": [sum(1 for layer, u in units if layer == i and u >= heads) for i in range(num_layers)]}

    return {"unpruned": {"layout": [heads] * num_layers, "blocks": [blocks] * num_layers},
            "planned": split(mask), "planned+step": split(grown)}


def parse_layout(text: str, num_layers: int, heads: int) -> list[int]:
    """Heads per layer from ``"10,10,8,8,12,12"``; a ValueError names the value when it does not fit the model."""
    try:
        layout = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--also: {text!r} is not comma-separated head counts") from None
    if len(layout) != num_layers or not all(0 <= n <= heads for n in layout):
        raise ValueError(f"--also: {text!r} must give {num_layers} counts in 0..{heads}")
    return layout


def check(run_dir: Path, step: int, log=print, also: tuple[str, ...] = ()) -> dict:
    from pipeline import budget as planner
    from pipeline.config import config_from_dict
    from pipeline.evaluation import task_spec
    from pipeline.stages.plan import time_layouts

    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    if not cfg.budget.active:
        raise ValueError(f"{run_dir / 'config.json'}: budget: no target set; this run has no latency budget")
    mask = json.loads((run_dir / "harden" / "mask.json").read_text())
    gates = json.loads((run_dir / "finetune" / "gates.json").read_text())
    logits = gates["logits"]
    if cfg.budget.ffn:
        if also:
            raise ValueError("--also: layouts of heads alone cannot be compared with a run that planned "
                             "feed-forward blocks too")
        items = units_to_check(logits, mask["kept_heads"], gates["ffn"]["logits"], mask["ffn"]["mask"], step)
    else:
        layouts = layouts_to_check(logits, mask["kept_heads"], step)
        layouts |= {f"also {text}": parse_layout(text, len(logits), len(logits[0])) for text in also}
        items = {name: {"layout": layout} for name, layout in layouts.items()}
    budget = cfg.budget
    timed = time_layouts(cfg, [{"name": name, **item} for name, item in items.items()], task_spec(cfg))
    measured = {point["name"]: point for point in timed["points"]}
    machine = timed["machine"]
    field = budget.target_fields[0]
    target = planner.resolve_target(field, getattr(budget, field), percentile=budget.percentile,
                                    batch=budget.batch, unpruned_ms=measured["unpruned"])
    # A fraction of the unpruned p50 is judged as the bench stage judges it: on pairs timed in the same round.
    by_pairs = target.field == "latency_fraction" and target.statistic == "p50_ms"
    rows = {}
    for name, item in items.items():
        layout, blocks = item["layout"], item.get("blocks")
        value = measured[name][target.statistic]
        fraction = value / measured["unpruned"][target.statistic]
        paired = planner.paired_fraction(measured[name]["rounds_p50_ms"], measured["unpruned"]["rounds_p50_ms"])
        judged = paired if paired is not None else fraction  # no round fast for both: the fastest rounds
        meets = judged <= target.value * (1 + 1e-9) if by_pairs else value <= target.latency_ms
        rows[name] = {"keep": sum(layout), "layout": layout, **({"blocks": blocks} if blocks is not None else {}),
                      "value_ms": value, "fraction_of_unpruned": fraction, "paired_fraction": paired,
                      "meets": meets, "rounds_p50_ms": measured[name]["rounds_p50_ms"],
                      "confirmed_rounds": measured[name]["confirmed_rounds"]}
        shown = f"K={sum(layout):2d} {layout}" + (f" blocks={sum(blocks):3d} {blocks}" if blocks is not None else "")
        log(f"{name:13s} {shown}: {target.statistic} {value:.3f} ms = {fraction:.3f} x unpruned "
            f"(paired over rounds {'none' if paired is None else f'{paired:.3f}'}); {'meets' if meets else 'misses'} "
            f"{target.describe()}")
    # None larger when K keeps every head (and every block).
    larger = items["planned+step"] != items["planned"]
    within = rows["planned"]["meets"] and not (larger and rows["planned+step"]["meets"])
    verdict = ("K is within one step of the largest K that meets the budget" if within else
               "K misses the budget" if not rows["planned"]["meets"] else
               f"K + {step} meets the budget too: the plan was too cautious")
    log(verdict)
    return {"run_dir": str(run_dir), "step": step, "target": {**vars(target), "description": target.describe()},
            "engine": budget.engine, "layouts": rows, "within_one_step": within, "verdict": verdict,
            "machine": machine}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget_check", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, default=6, help="heads added to the planned K (default 6)")
    parser.add_argument("--also", action="append", default=[], metavar="H,H,...",
                        help="another layout (heads per layer) to time beside them; repeatable")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.step < 1:
            raise ValueError(f"--step: must be >= 1, got {args.step}")
        result = check(args.run_dir, args.step, also=tuple(args.also))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        from pipeline.files import write_json_atomic

        write_json_atomic(args.out, result)
    return 0 if result["within_one_step"] else 1


if __name__ == "__main__":
    sys.exit(main())
