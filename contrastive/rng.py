"""Random state of one rank, CPU and training device together: captured for a replayed forward and saved per rank.

Dropout and drop path on a GPU draw from the CUDA generator, not the CPU one, so a forward replayed for
gradient accumulation (train.train_step) and a resumed run (train.train) restore both. The CUDA half of a
resume is checked by bench/gpu_check.py (a resumed run with drop path, bit for bit, on a GPU); on a CPU
tests/test_gpu_path.py checks replay and round trip with a stand-in device generator. No GPU check runs an
accumulated step yet.
"""
from __future__ import annotations

import torch


def _device_module(device: torch.device):
    """torch.cuda (or another accelerator's module) for a device with its own generator; None for the CPU."""
    return None if device.type == "cpu" else torch.get_device_module(device.type)


def capture(device: torch.device) -> dict:
    """The CPU generator's state and, on an accelerator, `device`'s generator state (tensors, not copied later)."""
    module = _device_module(device)
    return {"cpu": torch.get_rng_state(), "device": None if module is None else module.get_rng_state(device)}


def restore(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    module = _device_module(device)
    if module is not None and state.get("device") is not None:
        module.set_rng_state(state["device"], device)


def to_json(state: dict) -> dict:
    """Plain lists of bytes, for the rank file of a checkpoint."""
    return {key: None if value is None else value.tolist() for key, value in state.items()}


def from_json(saved: dict) -> dict:
    """A state from to_json; also reads the CPU-only `torch_rng` of checkpoints written before device states."""
    if "rng" not in saved:
        return {"cpu": torch.tensor(saved["torch_rng"], dtype=torch.uint8), "device": None}
    return {key: None if value is None else torch.tensor(value, dtype=torch.uint8) for key, value in saved["rng"].items()}
