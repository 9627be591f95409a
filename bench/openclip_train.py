"""Run open_clip's own trainer (open_clip_train.main) with this repo's model configs registered.

open_clip_train only knows registered model names; configs/models/*.json use open_clip's schema, so adding that
folder to open_clip's registry before main() lets `--model tiny-vit-32` (or any of ours) build the same
architecture our trainer builds. Every other argument goes to open_clip_train unchanged:

    bench/.venv-openclip/bin/python bench/openclip_train.py --model tiny-vit-32 --train-data ... [open_clip_train args]

Several ranks on CPUs (gloo), e.g. for bench/train_throughput.py; the `--` keeps torchrun's own parser away
from open_clip_train's `--logs` (torchrun reads it as an abbreviation of its `--logs-specs`):

    torchrun --nproc-per-node 2 bench/openclip_train.py -- --device cpu --model tiny-vit-32 ...

open_clip_train 3.3 already starts gloo for `--device cpu` and leaves the device alone there, but then wraps
the model as DistributedDataParallel(model, device_ids=[torch.device('cpu')]), which torch refuses ("device_ids
... only work with ... GPU modules"). For CPU modules DDP wants device_ids=None and does the same thing with
it (one replica, gradients all-reduced in buckets during backward), so `run` drops a device_ids list made only
of CPU devices; GPU runs are untouched.
"""
from __future__ import annotations

import sys
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def allow_ddp_on_cpu() -> None:
    """Make torch.nn.parallel.DistributedDataParallel accept device_ids=[cpu] (as device_ids=None)."""
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, "_drops_cpu_device_ids", False):
        return

    class CpuTolerantDDP(ddp):
        _drops_cpu_device_ids = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuTolerantDDP


def run(argv: list[str]):
    import open_clip
    from open_clip_train.main import main

    if argv[:1] == ["--"]:
        argv = argv[1:]
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    sys.path.insert(0, str(MODEL_CONFIG_DIR.parent.parent))
    import contrastive.towers  # noqa: F401  (our timm trunks, convnet_*, which some of configs/models name)

    allow_ddp_on_cpu()
    return main(argv)


if __name__ == "__main__":
    result = run(sys.argv[1:])
    sys.exit(1 if result == -1 else 0)  # main() returns -1 for "experiment already exists" and similar
