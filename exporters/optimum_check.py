"""Check that optimum's ``ORTModelForSequenceClassification`` loads a dsprune artifact and agrees with onnxruntime.

optimum-onnx needs transformers < 4.58, so this runs in its own environment (``make optimum-check``
builds ``.venv-optimum`` from ``requirements/optimum-check.txt``) and imports nothing of dsprune::

    .venv-optimum/bin/python exporters/optimum_check.py RUN/artifact [--file model.onnx] [--atol 1e-4]

Prints one JSON line (versions, max abs logit difference, labels) and exits 0 when optimum's logits
equal a plain onnxruntime session's on the same tokenized batch within ``--atol`` and the labels
match the manifest's, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a file, Python puts this folder first on sys.path, where exporters/onnx.py would shadow the
# onnx package that optimum imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

TEXTS = (
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "it is neither good nor bad , just long",
    "an unexpectedly moving story about two brothers who never quite understood each other",
)


def check(folder: Path, file: str = "model.onnx", atol: float = 1e-4) -> dict:
    """Logits of optimum's model and of a plain onnxruntime session on the same batch, compared."""
    from importlib.metadata import version

    import numpy as np
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    manifest = json.loads((folder / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForSequenceClassification.from_pretrained(folder, file_name=file, provider="CPUExecutionProvider")
    texts = list(TEXTS)
    if manifest["task"]["text_segments"] == 2:
        batch = tokenizer(texts, texts[::-1], padding=True, truncation=True,
                          max_length=manifest["tokenizer"]["max_length"], return_tensors="np")
    else:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=manifest["tokenizer"]["max_length"],
                          return_tensors="np")
    got = np.asarray(model(**batch).logits, dtype=np.float32)
    session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(batch[i.name], dtype=np.int64) for i in session.get_inputs()}
    expected = session.run(["logits"], feeds)[0]
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    return {
        "artifact": str(folder), "file": file, "shape": list(got.shape), "max_abs_diff": diff, "atol": atol,
        "labels": labels, "manifest_labels": manifest["labels"],
        "passed": diff <= atol and (manifest["labels"] is None or labels == manifest["labels"]),
        "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a dsprune artifact folder (RUN/artifact)")
    parser.add_argument("--file", default="model.onnx", help="the ONNX file of the folder to load")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted logit difference")
    args = parser.parse_args(argv)
    result = check(args.artifact, args.file, args.atol)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
