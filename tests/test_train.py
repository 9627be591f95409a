import json

import pytest
import torch

from contrastive.config import ModelConfig, OptimConfig, load_config
from contrastive.losses import build_loss
from contrastive.models import build_model, param_groups
from contrastive.train import lr_lambda, train, train_step


def _fixed_batch(synthetic_data, bundle, n=32):
    from contrastive.data import decode_image, eval_samples

    samples = [s for _, s in zip(range(n), eval_samples(synthetic_data["train"]))]
    images = torch.stack([bundle.preprocess_val(decode_image(s["jpg"])) for s in samples])
    return images, bundle.tokenizer([s["txt"].decode() for s in samples])


def _engine(overrides):
    from contrastive.engine import build_engine, init_distributed

    cfg = load_config(None, ["model.name=tiny-vit-32", "optim.warmup_steps=1", "optim.weight_decay=0",
                             "optim.lr=1e-3", "train.batch_size=32", *overrides])
    world = init_distributed()
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    engine, scheduler = build_engine(bundle.model, cfg, world, lambda s: 1.0)
    return cfg, bundle, engine


def test_steps_on_a_fixed_batch_lower_the_loss(synthetic_data):
    cfg, bundle, engine = _engine([])
    batch = _fixed_batch(synthetic_data, bundle)
    loss_fn = build_loss(cfg.loss)
    losses = [train_step(engine, batch, loss_fn=loss_fn)["loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_schedule_warms_up_then_decays():
    f = lr_lambda(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    model = build_model(ModelConfig(name="tiny-vit-32")).model
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("ln_final.weight") for n in no_decay_names)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2


def test_end_to_end_run_writes_metrics_checkpoints_and_config(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    record = train(cfg, run, progress=False).record
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6]
    for key in ("step", "loss", "lr", "logit_scale", "samples_per_s"):
        assert key in lines[0]
    assert record["step"] == 6
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").train.steps == 6
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert list((run / "tensorboard").iterdir())


def test_uint8_batches_normalised_in_the_step_train_exactly_as_float_batches(tmp_path, tiny_overrides):
    """data.uint8_batches: the workers ship uint8 pixels and the step normalises them on its device; the
    losses are those of float batches bit for bit (2 workers, so the batches cross process boundaries)."""
    losses = {}
    for flag in ("false", "true"):
        cfg = load_config(None, [*tiny_overrides, f"data.uint8_batches={flag}", "data.num_workers=2",
                                 "train.log_every=1"])
        run = tmp_path / flag
        train(cfg, run, progress=False)
        losses[flag] = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["true"]) == 6 and losses["true"] == losses["false"]


def test_uint8_batches_are_refused_where_the_workers_cannot_stop_before_normalize(synthetic_data):
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    from contrastive.config import ConfigError
    from contrastive.data import TrainLoader
    from contrastive.distributed import WorldInfo
    from contrastive.errors import UserError
    from tests.test_data import _jpeg

    with pytest.raises(ConfigError, match="fast_decode"):
        load_config(None, ["data.uint8_batches=true", "data.fast_decode=false"])
    jitter = image_transform_v2(PreprocessCfg(size=32), is_train=True,
                                aug_cfg=AugmentationCfg(use_timm=True, color_jitter=0.4))
    cfg = load_config(None, [f"data.train={synthetic_data['train']}", "data.uint8_batches=true"]).data
    with pytest.raises(UserError, match="uint8_batches"):
        TrainLoader(cfg, preprocess=jitter, tokenizer=None, batch_size_per_rank=4, seed=0, world=WorldInfo())
    # Left to itself (None) on a GPU, such a loader falls back to float batches.
    auto = load_config(None, [f"data.train={synthetic_data['train']}"]).data
    loader = TrainLoader(auto, preprocess=jitter, tokenizer=None, batch_size_per_rank=4, seed=0, world=WorldInfo(),
                         on_gpu=True)
    assert loader.transform(_jpeg(0, side=40)).dtype == torch.float32


def test_class_positives_reach_the_loss_from_the_shards(tmp_path, tiny_overrides, monkeypatch):
    """loss.positives=class: the training loop hands the loss each sample's .cls label as its positive key."""
    import io
    import tarfile

    import contrastive.train as train_module
    from contrastive.losses import infonce
    from tests.test_data import _jpeg

    (tmp_path / "set" / "train").mkdir(parents=True)
    (tmp_path / "set" / "classnames.txt").write_text("cat\ndog\nbird\n")
    with tarfile.open(tmp_path / "set" / "train" / "0.tar", "w") as tf:
        for i in range(64):
            for ext, data in (("jpg", _jpeg(i, side=32)), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    seen = []

    def spy(cfg):
        loss_fn = build_loss(cfg)

        def recording(*args, positive_keys_B=None, **kwargs):
            seen.append(positive_keys_B)
            return infonce(*args, positive_keys_B=positive_keys_B, **kwargs)
        recording.positives = loss_fn.positives
        return recording

    monkeypatch.setattr(train_module, "build_loss", spy)
    cfg = load_config(None, [*tiny_overrides, f"data.train={tmp_path / 'set' / 'train' / '0.tar'}",
                             "loss.positives=class", "train.steps=2", "data.resampled=false"])
    train(cfg, tmp_path / "run", progress=False)
    assert len(seen) == 2
    for keys in seen:  # class set 0: the id is the label itself
        assert keys.shape == (32,) and set(keys.tolist()) <= {0, 1, 2} and len(set(keys.tolist())) == 3


def test_encoding_each_distinct_caption_once_changes_neither_losses_nor_weights(synthetic_data):
    from contrastive.train import distinct_captions, text_draws_no_randomness

    cfg, bundle, _ = _engine([])
    images, texts = _fixed_batch(synthetic_data, bundle)
    texts = texts[torch.arange(32) % 5]  # 5 distinct captions, as templated data repeats them
    unique_UL, rows_B = distinct_captions(texts)
    assert unique_UL.shape[0] == 5 and torch.equal(unique_UL[rows_B], texts)
    loss_fn = build_loss(load_config(None, ["loss.positives=caption"]).loss)
    runs = []
    for batch in [(images, texts), (images, unique_UL, None, rows_B)]:
        _, _, engine = _engine([])
        assert text_draws_no_randomness(engine.module)
        losses = [train_step(engine, batch, loss_fn=loss_fn)["loss"] for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in engine.module.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    # Adam divides by the gradient's root mean square, so rounding in the batched matmuls shows up to ~1e-6.
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(params_a, params_b))
    # Micro-batches (accum_steps > 1) get each sample's caption back.
    _, _, engine = _engine([])
    loss = train_step(engine, (images, unique_UL, None, rows_B), loss_fn=loss_fn, accum_steps=2)["loss"]
    assert loss == pytest.approx(losses_a[0], rel=1e-5)


def test_a_text_tower_with_dropout_encodes_every_copy():
    from contrastive.train import text_draws_no_randomness

    class Dual(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.visual = torch.nn.Sequential(torch.nn.Dropout(0.5))
            self.text = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(p))

    assert text_draws_no_randomness(Dual(0.0))  # image-side dropout does not matter
    assert not text_draws_no_randomness(Dual(0.1))
