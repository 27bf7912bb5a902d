"""The accuracy study end to end on CPU: a tiny model, a 64-example SST-2 slice, 2 variants x 2 K x 1 seed."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.study import (
    grid,
    load_study_config,
    main,
    merge,
    parse_only,
    read_rows,
    run_study,
    study_config_from_dict,
)
from conftest import make_tiny_bert

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


@pytest.fixture(scope="module")
def study_setup(tmp_path_factory, tokenizer):
    from pipeline.surgery import save_pruned

    if not (GLUE / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE}")
    root = tmp_path_factory.mktemp("study")
    save_pruned(make_tiny_bert(), root / "tiny", tokenizer)
    config = root / "study.yaml"
    config.write_text(f"""
name: study-tiny
seeds: [0]
keeps: [6, 2]
variants: ["dsp:pipelined", random]
threads: 1
model: {{name: {root / 'tiny'}}}
data: {{task: sst2, train: {GLUE / 'SST-2' / 'train.tsv'}, dev: {GLUE / 'SST-2' / 'dev.tsv'},
       max_train_examples: 64, max_eval_examples: 64, max_seq_length: 32}}
reference: {{epochs: 1, batch_size: 16}}
pipelined: {{epochs: 1}}
timing: {{steps: 2, warmup: 1, rounds: 1, methods: [dsp], sync_probes: true, hooks_probe: true, gate_probes: true, profile: true}}
""")
    threads = torch.get_num_threads()
    yield root, config
    torch.set_num_threads(threads)


def test_study_writes_rows_resumes_and_merges(study_setup):
    root, config_path = study_setup
    config = load_study_config(config_path)
    out = root / "run"
    run_study(config, out, log=lambda _: None)
    rows = read_rows([out])
    kinds = sorted(r["kind"] for r in rows)
    assert kinds == ["reference", "row", "row", "row", "row", "step_time"]
    grid_rows = [r for r in rows if r["kind"] == "row"]
    for row in grid_rows:
        assert sum(row["heads_per_layer"]) == row["keep"]
        assert 0.0 <= row["value"] <= 1.0 and row["metric"] == "accuracy"
        assert row["machine"]["versions"]["torch"]
    dsp = next(r for r in grid_rows if r["variant"] == "dsp:pipelined" and r["keep"] == 2)
    assert dsp["train_steps"] == 4  # one epoch of 64 examples in batches of 16
    assert (out / "reference-seed0" / "config.json").is_file()
    step_time = next(r for r in rows if r["kind"] == "step_time")
    assert set(step_time["step_ms"]) == {"plain", "dsp", "plain+sync-mid", "plain+sync-after", "plain+hooks",
                                         "plain+hooks@device", "dsp+unstepped"}
    assert step_time["step_ratio"]["dsp"] > 0
    assert {name: len(times) for name, times in step_time["step_ms_rounds"].items()} == {
        "plain": 1, "dsp": 1, "plain+sync-mid": 1, "plain+sync-after": 1, "plain+hooks": 1, "plain+hooks@device": 1,
        "dsp+unstepped": 1}
    for name, phases in step_time["step_phase_ms"].items():  # one pass: the phases' means add up to its mean step
        assert set(phases) == {"forward", "backward", "clip", "optimizer", "rest"} and min(phases.values()) > 0
        assert sum(phases.values()) == pytest.approx(step_time["step_ms"][name], rel=1e-3, abs=5e-3)
    assert set(step_time["profiles"]) == set(step_time["profile_counts_per_step"]) == {"plain", "dsp", "plain+hooks"}
    counts = step_time["profile_counts_per_step"]
    assert counts["dsp"]["events"] > counts["plain+hooks"]["events"] > counts["plain"]["events"] > 0  # on this CPU
    assert counts["plain"]["kernel_launches"] == counts["plain"]["stream_syncs"] == 0

    with pytest.raises(FileExistsError, match="--resume"):
        run_study(config, out, log=lambda _: None)
    lines_before = sum(len(f.read_text().splitlines()) for f in out.glob("rows*.jsonl"))
    run_study(config, out, resume=True, log=lambda _: None)  # nothing left to do
    assert sum(len(f.read_text().splitlines()) for f in out.glob("rows*.jsonl")) == lines_before

    # A killed run: drop one row, resume, and only that row is redone.
    files = sorted(out.glob("rows*.jsonl"))
    kept = [line for f in files for line in f.read_text().splitlines() if '"keep": 6' not in line or "random" not in line]
    for f in files:
        f.unlink()
    (out / "rows-old.jsonl").write_text("\n".join(kept) + "\n")
    messages = []
    run_study(config, out, resume=True, log=messages.append)
    assert "0 timing, 0 reference and 1 grid jobs" in messages[0]
    assert len(read_rows([out])) == lines_before

    results = root / "results"
    assert main(["merge", str(out), "--results", str(results)]) == 0
    merged = json.loads((results / "study-tiny.json").read_text())
    assert {(s["variant"], s["keep"]) for s in merged["summary"]} == {
        ("dsp:pipelined", 6), ("dsp:pipelined", 2), ("random", 6), ("random", 2)}
    assert merged["reference"]["n"] == 1 and len(merged["rows"]) == 4
    table = (results / "study-tiny.md").read_text()
    assert "| dsp:pipelined |" in table and "K=6" in table and "dsp" in table.split("Training step")[1]
    assert (results / "study-tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_only_and_shard_partition_the_rows():
    config = study_config_from_dict({"seeds": [0, 1], "keeps": [36, 6],
                                     "variants": ["dsp:joint", "michel", "random"]})
    everything = grid(config)
    assert len(everything) == 12
    shards = [grid(config, shard=(i, 3)) for i in range(3)]
    assert sorted(j.key for s in shards for j in s) == sorted(j.key for j in everything)
    only = grid(config, parse_only("method=dsp,k=36,seed=0"))
    assert [j.key for j in only] == ["dsp:joint|k=36|seed=0"]
    with pytest.raises(ValueError, match="--only"):
        parse_only("heads=3")


def test_bad_study_config_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("variants: [dsp]\nkeeps: [6]\nbogus: 1\n")
    assert main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bogus: unknown key" in err and "needs :joint or :pipelined" in err and err.count("\n") == 1


def test_heads_and_blocks_rows_match_the_flops_of_heads_only_rows(study_setup):
    root, config_path = study_setup
    config = load_study_config(config_path, ["variants=[dsp+ffn:pipelined, random+ffn, random]", "keeps=[4]",
                                             "flops_fractions=[0.5]", "ffn_block_size=32", "timing.methods=[]"])
    assert sorted(j.key for j in grid(config)) == sorted([
        "dsp+ffn:pipelined|k=4|seed=0", "random+ffn|k=4|seed=0", "random|k=4|seed=0",
        "dsp+ffn:pipelined|f=0.5|seed=0", "random+ffn|f=0.5|seed=0"])
    out = root / "ffn-run"
    run_study(config, out, log=lambda _: None)
    rows = {r["key"]: r for r in read_rows([out]) if r["kind"] == "row"}
    heads_only = rows["random|k=4|seed=0"]["flops_kept_fraction"]
    for variant in ("dsp+ffn:pipelined", "random+ffn"):
        matched, half = rows[f"{variant}|k=4|seed=0"], rows[f"{variant}|f=0.5|seed=0"]
        assert matched["flops_kept_fraction"] <= heads_only + 1e-9  # the same FLOPs as 4 heads alone, at most
        assert half["flops_kept_fraction"] <= 0.5 and half["flops_budget"] == 0.5
        assert sum(half["ffn_blocks_per_layer"]) < 2 * 4  # blocks were removed too
    results = root / "ffn-results"
    merge([out], results)
    table = (results / "study-tiny.md").read_text()
    assert "against FLOPs kept" in table and "| random+ffn | f=0.5 |" in table


def test_merge_reads_earlier_merged_results(study_setup, tmp_path):
    """A new study's rows merge with an earlier study's committed results file."""
    root, config_path = study_setup
    earlier = root / "results" / "study-tiny.json"
    if not earlier.is_file():
        pytest.skip("needs the merged results of test_study_writes_rows_resumes_and_merges")
    rows = read_rows([earlier])
    merged = json.loads(earlier.read_text())
    assert len(rows) == len(merged["rows"]) + len(merged["references"]) + len(merged["step_time"])
    assert merge([earlier], tmp_path, "again")["json"].is_file()


def test_distilled_rows_train_the_reference_first_and_run(study_setup):
    root, config_path = study_setup
    config = load_study_config(config_path, ["variants=[ste+kd:joint, dsp+ffn+kd:joint]", "keeps=[2]",
                                             "flops_fractions=[]", "ffn_block_size=32", "timing.methods=[]",
                                             "distill.weight=0.7"])
    out = root / "kd-run"
    run_study(config, out, log=lambda _: None)
    rows = read_rows([out])
    assert sorted(r["key"] for r in rows if r["kind"] != "step_time") == sorted([
        "reference|seed=0", "ste+kd:joint|k=2|seed=0", "dsp+ffn+kd:joint|k=2|seed=0"])
    ste = next(r for r in rows if r["key"] == "ste+kd:joint|k=2|seed=0")
    assert sum(ste["heads_per_layer"]) == 2 and ste["train_steps"] == 12  # 3 joint epochs of 4 batches


def test_joint_rows_from_the_finetuned_reference(study_setup):
    root, config_path = study_setup
    config = load_study_config(config_path, ["variants=[ste:joint]", "keeps=[2]", "timing.methods=[]",
                                             "joint.init=finetuned", "joint.epochs=1"])
    out = root / "ft-run"
    run_study(config, out, log=lambda _: None)
    rows = {r["key"]: r for r in read_rows([out])}
    assert "reference|seed=0" in rows and rows["ste:joint|k=2|seed=0"]["init"] == "finetuned"
    with pytest.raises(Exception, match="joint.init"):
        load_study_config(config_path, ["joint.init=scratch"])
