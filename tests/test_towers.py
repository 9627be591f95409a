"""Our small conv trunks (contrastive/towers.py): registered with timm, built through open_clip configs,
channels-last only changes speed, and they train under ZeRO on two gloo ranks."""
from __future__ import annotations

import copy

import pytest
import torch

from contrastive.config import load_config
from contrastive.models import build_model
from tests.test_deepspeed import _losses, _run


@pytest.mark.parametrize("name, stride", [("convnet_xs", 1), ("convnet_s", 1), ("convnet_xs_s2", 2)])
def test_trunks_are_timm_models_that_keep_resolution_per_stage(name, stride):
    import timm

    import contrastive.towers  # noqa: F401

    trunk = timm.create_model(name, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    features = trunk.forward_features(x)
    assert features.shape[-1] == 32 // stride // 8  # three max-pools, after the stem's stride
    assert trunk(x).shape == (2, trunk.num_features)
    assert timm.create_model(name, num_classes=7)(x).shape == (2, 7)


def test_channels_last_gives_the_contiguous_result():
    import contrastive.towers as towers

    trunk = towers.convnet_xs().eval()
    plain = copy.deepcopy(trunk).to(memory_format=torch.contiguous_format)
    plain.forward_features = lambda x: plain.stages(plain.stem(x))  # no channels-last conversion
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trunk(x), plain(x), atol=1e-5)


def test_the_cifar_model_config_builds_a_dual_encoder():
    cfg = load_config(None, ["model.name=cifar-convnet-xs"])
    bundle = build_model(cfg.model)
    out = bundle.model(torch.randn(3, 3, 32, 32), bundle.tokenizer(["a photo of a cat."] * 3))
    assert out["image_features"].shape == out["text_features"].shape == (3, 128)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)


def test_a_conv_tower_trains_under_zero2_on_two_ranks(tmp_path, tiny_overrides):
    """Channels-last activations go through DeepSpeed's broadcast and ZeRO-2 partitioning on gloo."""
    overrides = [o for o in tiny_overrides if not o.startswith(("model.name", "train.", "optim."))] + [
        "model.name=demo-convnet", "deepspeed.zero_stage=2", "train.steps=8", "train.log_every=1",
        "train.batch_size=32", "train.checkpoint_every=8", "optim.lr=3e-3", "optim.warmup_steps=1"]
    _run(tmp_path / "two", 2, overrides)
    losses = _losses(tmp_path / "two")
    assert list(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses
