"""Locked towers (LiT): what each lock_* key freezes, frozen BatchNorm statistics in train mode, and locked
parameters that neither change nor get optimizer state under DeepSpeed ZeRO 0-3 on two gloo ranks."""
from __future__ import annotations

import contextlib

import pytest
import torch

from contrastive.config import ModelConfig, load_config
from contrastive.errors import UserError
from contrastive.models import build_model, get_open_clip_config
from contrastive.pretrained import MINILM
from tests.dist import run_ranks


def _trainable(model, prefix: str = "") -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)}


def test_lock_image_vit_leaves_the_last_groups_trainable():
    model = build_model(ModelConfig(name="tiny-vit-32", lock_image=True)).model
    assert _trainable(model, "visual.") == set()
    assert "logit_scale" in _trainable(model) and "text_projection" in _trainable(model)
    model = build_model(ModelConfig(name="tiny-vit-32", lock_image=True, lock_image_unlocked_groups=2)).model
    last = len(model.visual.transformer.resblocks) - 1
    expected = {"visual.proj"} | {f"visual.{n}" for n, _ in model.visual.named_parameters()
                                  if n.startswith((f"transformer.resblocks.{last}.", "ln_post."))}
    assert _trainable(model, "visual.") == expected


@pytest.mark.parametrize("freeze_layer_norm", [True, False])
def test_lock_text_native_tower(freeze_layer_norm):
    model = build_model(ModelConfig(name="tiny-vit-32", lock_text=True,
                                    lock_text_freeze_layer_norm=freeze_layer_norm)).model
    text = {n for n, _ in model.named_parameters() if not n.startswith(("visual.", "logit_"))}
    assert "token_embedding.weight" in text and "text_projection" in text
    layer_norms = {n for n in text if n.startswith("ln_final.") or ".ln_" in n}
    assert layer_norms and _trainable(model) & text == (set() if freeze_layer_norm else layer_norms)
    assert {n for n, _ in model.named_parameters() if n.startswith("visual.")} <= _trainable(model)


def test_lock_text_hf_tower_unlocks_the_last_layers():
    model = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=MINILM, lock_text=True,
                                    lock_text_unlocked_layers=2, lock_text_freeze_layer_norm=True)).model
    text = _trainable(model, "text.")
    assert "text.proj.weight" in text  # open_clip keeps an HF tower's projection trainable
    layers = {n.split(".")[4] for n in text if n.startswith("text.transformer.encoder.layer.")}
    assert layers == {"4", "5"} and not any("embeddings" in n for n in text)
    model = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=MINILM, lock_text=True)).model
    text = _trainable(model, "text.") - {"text.proj.weight"}
    assert text and all(".LayerNorm." in n for n in text)  # lock_text_freeze_layer_norm=false: LN stays trainable


def _timm_resnet_arch() -> dict:
    arch = get_open_clip_config("tiny-vit-32")
    arch["vision_cfg"] = {"timm_model_name": "test_resnet", "timm_model_pretrained": False, "timm_pool": "avg",
                          "timm_proj": "linear", "image_size": 32}
    return arch


def _bn_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.visual.named_buffers() if "running_" in n}


def test_frozen_bn_stats_stay_frozen_in_train_mode_and_load_into_the_plain_model():
    torch.manual_seed(0)
    locked = build_model(ModelConfig(lock_image=True, lock_image_freeze_bn_stats=True), model_cfg=_timm_resnet_arch()).model
    plain = build_model(ModelConfig(), model_cfg=_timm_resnet_arch()).model
    x = torch.randn(4, 3, 32, 32)
    before = _bn_buffers(locked)
    locked.train()
    with torch.no_grad():
        out_train = locked.encode_image(x)
    assert all(torch.equal(before[n], b) for n, b in _bn_buffers(locked).items())
    with torch.no_grad():
        assert torch.equal(out_train, locked.eval().encode_image(x))
    # Same state-dict keys as the plain model: a checkpoint of the locked run reloads for inference.
    state = locked.state_dict()
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state, strict=True)
    locked.load_state_dict(state, strict=True)  # and into the locked model again (resume)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval().encode_image(x), out_train)
    # Without freeze_bn_stats the statistics move in train mode (what the option prevents).
    moving = build_model(ModelConfig(lock_image=True), model_cfg=_timm_resnet_arch()).model.train()
    before = _bn_buffers(moving)
    with torch.no_grad():
        moving.encode_image(x)
    assert any(not torch.equal(before[n], b) for n, b in _bn_buffers(moving).items())
    assert _trainable(moving, "visual.trunk.") == set() and _trainable(moving, "visual.head.")


def _optimizer_state_numel(engine) -> int:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


def _train_locked(rank: int, world_size: int, stages: tuple[int, ...]) -> dict:
    import deepspeed

    from contrastive.engine import build_engine, init_distributed
    from contrastive.losses import build_loss
    from contrastive.train import train_step

    results = {}
    for stage in stages:
        cfg = load_config(None, ["model.name=tiny-vit-32", "model.lock_text=true", "train.batch_size=8",
                                 f"deepspeed.zero_stage={stage}", "optim.lr=1e-2", "optim.warmup_steps=1"])
        world = init_distributed()
        torch.manual_seed(0)
        bundle = build_model(cfg.model)
        initial = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
        frozen = {n for n, p in bundle.model.named_parameters() if not p.requires_grad}
        engine, _ = build_engine(bundle.model, cfg, world, lambda s: 1.0)
        gen = torch.Generator().manual_seed(rank)
        images = torch.randn(4, 3, 32, 32, generator=gen)
        texts = bundle.tokenizer([f"a photo of shape {i + 4 * rank}" for i in range(4)])
        loss_fn = build_loss(cfg.loss)
        for _ in range(3):
            assert train_step(engine, (images, texts), loss_fn=loss_fn)["updated"]
        params = list(engine.module.named_parameters())
        gather = deepspeed.zero.GatheredParameters([p for _, p in params]) if stage == 3 else contextlib.nullcontext()
        with gather:
            changed = {n for n, p in params if not torch.equal(p.detach().cpu(), initial[n])}
        results[stage] = {"state_numel": _optimizer_state_numel(engine), "changed": changed, "frozen": frozen,
                          "num_frozen": sum(initial[n].numel() for n in frozen),
                          "num_trainable": sum(v.numel() for n, v in initial.items() if n not in frozen)}
    return results


def test_locked_parameters_do_not_change_nor_get_optimizer_state_under_zero():
    per_rank = run_ranks(_train_locked, world_size=2, args=((0, 1, 2, 3),), env={"DS_ACCELERATOR": "cpu"},
                         timeout_s=300)
    for stage in (0, 1, 2, 3):
        ranks = [r[stage] for r in per_rank]
        frozen, num_trainable = ranks[0]["frozen"], ranks[0]["num_trainable"]
        assert frozen and "token_embedding.weight" in frozen
        for r in ranks:
            assert not (r["changed"] & frozen), (stage, sorted(r["changed"] & frozen)[:3])
            assert "visual.proj" in r["changed"] and "logit_scale" in r["changed"], stage
        # Optimizer state covers the trainable parameters only (ZeRO partitions pad each group a little);
        # the frozen text tower is 30x larger than what trains, so any state for it would show.
        total = sum(r["state_numel"] for r in ranks) if stage else ranks[0]["state_numel"]
        assert ranks[0]["num_frozen"] > 10 * num_trainable
        assert num_trainable <= total <= num_trainable + 256, (stage, total, num_trainable)


def test_text_feature_cache_equals_the_locked_tower_without_dropout():
    cfg = dict(name="tiny-vit-32", text_pretrained=MINILM, text_pooler="mean", text_context_length=16,
               lock_text=True, lock_text_freeze_layer_norm=True)
    cached = build_model(ModelConfig(**cfg, lock_text_cache_size=4))
    plain = build_model(ModelConfig(**cfg)).model
    assert cached.model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(cached.model.state_dict())
    plain.eval()  # the reference: the same tower without dropout
    cached.model.train()
    cache = cached.model.text.feature_cache
    for texts in (["a cat", "a dog", "a cat", "a ship"], ["a ship", "a frog", "a bird", "a cat", "a truck"]):
        ids = cached.tokenizer(texts)
        got = cached.model.encode_text(ids)
        expected = plain.encode_text(ids)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Only the projection trains: its gradient is the same as through the full tower.
        got.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(cached.model.text.proj.weight.grad, plain.text.proj.weight.grad)
        cached.model.zero_grad()
        plain.zero_grad()
        assert len(cache.features) <= 4
    assert (cache.misses, cache.hits) == (3 + 3, 2)  # 3 new, then frog, bird, truck new and ship, cat cached
    for p in cached.model.text.transformer.parameters():
        p.ds_id = 0  # as ZeRO-3 marks partitioned parameters
    with pytest.raises(UserError, match="does not work under ZeRO-3"):
        cached.model.encode_text(cached.tokenizer(["a horse"]))


def test_text_feature_cache_needs_a_fully_locked_pretrained_tower():
    from contrastive.config import ConfigError

    with pytest.raises(ConfigError, match="needs a fully locked pretrained text tower"):
        load_config(None, ["model.text_pretrained=x", "model.lock_text=true", "model.lock_text_cache_size=10"])
