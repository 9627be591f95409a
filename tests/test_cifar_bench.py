"""The open_clip baseline harness (bench/quality_vs_open_clip.py): open_clip_train's command line mirrors our
config, its checkpoints load into our models bit for bit, and the time planning reads its logs right.

open_clip_train ships in the open_clip_torch wheel of our .venv; with `--dataset-type synthetic` it runs here
without webdataset (whose 1.x breaks its shard reader), which is enough to exercise our wrapper end to end.
"""
import re
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import quality_vs_open_clip as bench  # noqa: E402
from tests.test_quality_bench import run_wrapper  # noqa: E402,F401 (fixture: runs openclip_train in-process)


def _cfg(*overrides):
    from contrastive.config import load_config

    return load_config(None, ["model.name=tiny-vit-32", "train.batch_size=16", "optim.lr=0.002",
                              "optim.weight_decay=0.05", "optim.warmup_steps=7", "optim.grad_clip=0.5",
                              "data.num_workers=1", "train.seed=5", "model.aug={scale: [0.5, 1.0], use_timm: true}",
                              *overrides])


def test_command_line_mirrors_our_config():
    from open_clip_train.params import parse_args

    cfg = _cfg()
    argv = bench.openclip_train_args(cfg, train_spec="/d/{00000..00003}.tar", samples_per_epoch=320, epochs=4,
                                     logs=REPO / "runs" / "x")
    a = parse_args(argv)
    assert (a.model, a.batch_size, a.lr, a.wd, a.warmup, a.grad_clip_norm) == ("tiny-vit-32", 16, 0.002, 0.05, 7, 0.5)
    assert (a.beta1, a.beta2, a.eps) == (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps)
    assert (a.workers, a.seed, a.precision, a.device, a.epochs, a.train_num_samples) == (1, 5, "fp32", "cpu", 4, 320)
    assert a.dataset_type == "webdataset" and a.dataset_resampled and a.train_data == "/d/{00000..00003}.tar"
    assert a.aug_cfg == {"scale": (0.5, 1.0), "use_timm": True}
    assert a.save_most_recent and a.save_frequency == 1 and a.lr_scheduler == "cosine"
    # The same arithmetic on both sides: our bf16 autocast is open_clip's amp_bf16; DeepSpeed's bf16 weights
    # have no open_clip_train equivalent.
    argv = bench.openclip_train_args(_cfg("deepspeed.precision=amp_bf16"), train_spec="/d/0.tar", samples_per_epoch=32,
                                     epochs=1, logs=REPO / "runs" / "x")
    assert parse_args(argv).precision == "amp_bf16"
    with pytest.raises(SystemExit, match="deepspeed.precision=bf16 has no open_clip_train equivalent"):
        bench.openclip_train_args(_cfg("deepspeed.precision=bf16"), train_spec="/d/0.tar", samples_per_epoch=32,
                                  epochs=1, logs=REPO / "runs" / "x")


def test_differences_are_reported():
    assert bench.differences_from_open_clip(_cfg()) == []
    notes = bench.differences_from_open_clip(_cfg("loss.label_smoothing=0.1", "optim.min_lr_ratio=0.1"))
    assert len(notes) == 2 and "label smoothing 0.1" in notes[0]
    (note,) = bench.differences_from_open_clip(_cfg("loss.positives=class"))
    assert "loss.positives='class'" in note
    cfg = _cfg("model.aug={scale: [0.5, 1.0], hflip: 0.5}")
    (note,) = bench.differences_from_open_clip(cfg)
    assert "hflip=0.5" in note
    assert bench.aug_cfg_args(dict(cfg.model.aug)) == ["--aug-cfg", "scale=(0.5,1.0)"]


def test_wrapper_trains_our_model_config_and_its_checkpoint_scores_like_open_clips_own_load(tmp_path, run_wrapper):
    import open_clip

    from contrastive.models import build_model

    cfg = _cfg("model.aug={}")
    argv = bench.openclip_train_args(cfg, train_spec="", samples_per_epoch=32, epochs=1, logs=tmp_path, log_every=1)
    i = argv.index("--dataset-type")
    argv[i + 1] = "synthetic"
    argv = [a for a in argv if a != "--dataset-resampled"]
    argv[argv.index("--train-data"):argv.index("--train-data") + 2] = []
    run_wrapper(argv)
    log = (tmp_path / bench.OPENCLIP_NAME / "out.log").read_text()
    assert len(re.findall(r"Batch \(t\)", log)) == 2  # 32 samples / batch 16, one log line per step
    ckpt_path = tmp_path / bench.OPENCLIP_NAME / "checkpoints" / "epoch_latest.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1

    # Reference: open_clip's own model for that config, loaded as open_clip_train's resume does.
    reference = open_clip.create_model("tiny-vit-32")
    reference.load_state_dict(ckpt["state_dict"])
    reference.eval()
    # Saved with DDP's prefix, as a multi-process open_clip_train run writes it.
    ddp_path = tmp_path / "ddp.pt"
    torch.save({**ckpt, "state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}}, ddp_path)
    for path in (ckpt_path, ddp_path):
        ours = build_model(cfg.model)
        assert bench.load_open_clip_checkpoint(ours.model, path) == {"epoch": 1}
        ours.model.eval()
        images, tokens = torch.randn(3, 3, 32, 32), ours.tokenizer(["a cat", "a dog", "a ship"])
        with torch.no_grad():
            torch.testing.assert_close(ours.model.encode_image(images), reference.encode_image(images),
                                       rtol=0, atol=0)
            torch.testing.assert_close(ours.model.encode_text(tokens), reference.encode_text(tokens), rtol=0, atol=0)
            assert ours.model.logit_scale.item() == reference.logit_scale.item()
    # The trained weights moved away from a fresh init (a real checkpoint, not the initial model).
    fresh = build_model(cfg.model).model
    assert not torch.equal(fresh.visual.conv1.weight, reference.visual.conv1.weight)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    import open_clip

    from contrastive.models import build_model

    from contrastive.models import register_model_configs

    register_model_configs()
    other = open_clip.create_model("demo-vit-48")
    path = tmp_path / "other.pt"
    torch.save({"epoch": 3, "state_dict": other.state_dict()}, path)
    with pytest.raises(RuntimeError, match="does not match"):
        bench.load_open_clip_checkpoint(build_model(_cfg().model).model, path)
