"""Every tower we ship trains under every precision we offer (deepspeed.precision fp32, bf16, fp16, amp_bf16) on
a CPU, and the BatchNorm layers that let the conv towers do so compute as fp32 BatchNorm does."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from contrastive.checkpoint import DS_MODEL_FILE, find_weights
from contrastive.config import PRECISIONS, load_config
from contrastive.engine import safe_torch_load
from contrastive.models import MODEL_CONFIG_DIR, build_model, frozen_batch_norm_class
from contrastive.train import train
from tests.conftest import REPO
from tests.test_deepspeed import _losses, _run

TOWERS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
OFFERED = tuple(p for p in PRECISIONS if p != "auto")  # auto picks one of them (fp32 on a CPU)
# The dtype DeepSpeed casts parameters to (amp_bf16 keeps fp32 weights and runs the forward under autocast).
PARAM_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _fp16_runs_here() -> bool:
    from contrastive.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def _train_briefly(run, tiny_overrides, overrides) -> tuple[dict, nn.Module, dict]:
    """3 steps of 2 samples through contrastive.train.train: (losses by step, the model as it was built (its
    initial weights), the trained state dict). fp16 convolutions are slow on a CPU (torch's fp16 weight
    gradient there: ~1 s for one 64-channel 3x3 layer on 4 images of 32 px), hence the 2 samples."""
    if "deepspeed.precision=fp16" in overrides and not _fp16_runs_here():
        pytest.skip("DeepSpeed runs fp16 on CPUs with fp16 instructions only (AVX512-FP16 or AMX-FP16)")
    # A constant lr of 2e-2 and a tiny eps: Adam moves every weight with a nonzero gradient by about lr per step
    # (its update is lr * m / (sqrt(v) + eps)), more than half a bf16 step (2^-8 relative) at the weights' sizes,
    # also where the gradient is tiny (behind a residual branch's zero-initialised last BatchNorm in a ResNet).
    cfg = load_config(None, [*tiny_overrides, "train.steps=3", "train.log_every=1", "train.checkpoint_every=3",
                             "train.batch_size=2", "optim.lr=2e-2", "optim.eps=1e-12", "optim.warmup_steps=1",
                             "optim.min_lr_ratio=1", *overrides])
    train(cfg, run, progress=False)
    torch.manual_seed(cfg.train.seed)  # as train() seeds before building the model: its initial weights
    # The engine's module as saved (whole at ZeRO 0-2, in the dtype it trains in), not the fp32 master copy that
    # checkpoint.load_full_state_dict consolidates where DeepSpeed's zero_to_fp32 can.
    trained = safe_torch_load(find_weights(run) / DS_MODEL_FILE)["module"]
    return _losses(run), build_model(cfg.model).model, trained


def _moved(initial: torch.Tensor, trained: torch.Tensor, precision: str) -> bool:
    """Whether a trained weight differs from its initial value, both seen in the dtype the engine trains it in
    (DeepSpeed's fp32 master copies start from the half-precision weights, too). Asked of weights of more than
    one element: a single number (the logit scale) can come back to its start when its gradient changes sign
    between steps, as it does on batches of 2 (tests/test_gpu_path.py trains the logit scale)."""
    return not torch.equal(trained.float(), initial.to(PARAM_DTYPE.get(precision, torch.float32)).float())


@pytest.mark.parametrize("precision", OFFERED)
@pytest.mark.parametrize("tower", TOWERS)
def test_every_tower_trains_under_every_precision(tmp_path, tiny_overrides, tower, precision):
    losses, model, trained = _train_briefly(
        tmp_path, tiny_overrides, [f"model.name={tower}", f"deepspeed.precision={precision}"])
    assert list(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    stuck = [n for n, p in model.named_parameters() if p.numel() > 1 and not _moved(p.detach(), trained[n], precision)]
    assert not stuck, f"{tower} under {precision}: weights that did not train: {stuck}"


@pytest.mark.parametrize("precision", ["bf16", "fp16", "amp_bf16"])  # fp32: tests/test_lock.py
def test_a_locked_conv_tower_with_frozen_batch_norm_statistics_trains_under_every_precision(
        tmp_path, tiny_overrides, precision):
    """Frozen BatchNorm keeps its statistics and affine as buffers, which DeepSpeed leaves in fp32."""
    lock = ["model.name=cifar-convnet-xs", "model.lock_image=true", "model.lock_image_unlocked_groups=1",
            "model.lock_image_freeze_bn_stats=true"]
    losses, model, trained = _train_briefly(tmp_path, tiny_overrides, [*lock, f"deepspeed.precision={precision}"])
    assert list(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    initial = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {f"{m}.{b}" for m, module in model.named_modules() if isinstance(module, frozen_batch_norm_class())
              for b in ("running_mean", "running_var", "weight", "bias")}
    assert "visual.trunk.stem.1.running_var" in frozen and "visual.trunk.stages.2.res.0.1.running_var" not in frozen
    for name in frozen:  # buffers: fp32 under every precision
        assert torch.equal(trained[name], initial[name]), name
    locked = {n for n, _ in model.named_parameters()} - trainable
    assert locked and {n for n in locked if _moved(initial[n], trained[n], precision)} == set()
    assert {n for n in trainable if initial[n].numel() > 1 and not _moved(initial[n], trained[n], precision)} == set()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_conv_tower_trains_in_bf16_on_two_ranks(tmp_path, tiny_overrides, zero_stage):
    """The issue's report: the demo's conv tower, deepspeed.precision=bf16, ZeRO 2 and 3, 2 gloo ranks."""
    overrides = [o for o in tiny_overrides if not o.startswith(("model.name", "train.", "optim."))] + [
        "model.name=demo-convnet", "deepspeed.precision=bf16", f"deepspeed.zero_stage={zero_stage}",
        "train.steps=8", "train.log_every=1", "train.batch_size=32", "train.checkpoint_every=8", "optim.lr=3e-3",
        "optim.warmup_steps=1"]
    _run(tmp_path / "run", 2, overrides)
    losses = _losses(tmp_path / "run")
    assert list(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values()), losses
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batch_norm_with_half_precision_parameters_computes_as_fp32_batch_norm(dtype, momentum):
    """As DeepSpeed leaves it (parameters in half precision, statistics in fp32), our BatchNorm2d gives fp32
    BatchNorm's output rounded to the activations' dtype, its gradients, and its running statistics."""
    from contrastive.models import batch_norm_in_fp32

    torch.manual_seed(0)
    reference = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    ours = copy.deepcopy(reference)
    batch_norm_in_fp32(ours)
    x = torch.randn(4, 6, 5, 5)
    with torch.no_grad():  # with one dtype throughout it is torch's BatchNorm, bit for bit
        assert torch.equal(copy.deepcopy(ours)(x), copy.deepcopy(reference)(x))
    for p in ours.parameters():
        p.data = p.data.to(dtype)
    reference.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x_half = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x_half.detach().float().requires_grad_()
    grad_out = torch.randn(4, 6, 5, 5)
    for training in (True, True, False):
        ours.train(training)
        reference.train(training)
        y, y_ref = ours(x_half), reference(x_ref)
        assert y.dtype == dtype
        eps = torch.finfo(dtype).eps  # the distance from 1 to the next value: one rounding step or two
        torch.testing.assert_close(y.float(), y_ref.to(dtype).float(), rtol=eps, atol=eps)
        y.backward(grad_out.to(dtype))
        y_ref.backward(grad_out.to(dtype).float())
        for name, p in ours.named_parameters():
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad.float(), getattr(reference, name).grad.to(dtype).float(),
                                       rtol=2 * eps, atol=1e-3)
        torch.testing.assert_close(x_half.grad.float(), x_ref.grad.to(dtype).float(), rtol=0.02, atol=1e-2)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert getattr(ours, name).dtype == getattr(reference, name).dtype
            torch.testing.assert_close(getattr(ours, name), getattr(reference, name))
        for t in (x_half, x_ref, *ours.parameters(), *reference.parameters()):
            t.grad = None
    assert reference.num_batches_tracked.item() == 2


def test_fp16_on_a_cpu_without_fp16_instructions_is_refused_in_one_line(monkeypatch, capsys, tmp_path, tiny_overrides):
    """DeepSpeed stops such a run at start-up with a traceback (ValueError: Type fp16 is not supported...)."""
    from contrastive import cli
    from contrastive.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    code = cli.main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(tmp_path / "run"),
                     *tiny_overrides, "deepspeed.precision=fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "deepspeed.precision=fp16 does not run on this cpu" in err and "use bf16, amp_bf16 or fp32" in err
