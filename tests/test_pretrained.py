"""Pretrained towers from local files: the MiniLM text tower against transformers' own model, timm image weights
against timm's own model, self-contained checkpoints, and one clear line for every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from contrastive.config import ModelConfig, load_config
from contrastive.errors import UserError
from contrastive.models import build_model, get_open_clip_config
from contrastive.pretrained import MINILM, TOKENIZER_FILES, local_path
from tests.conftest import REPO

TEXTS = ["a photo of a cat.", "a photo of a kitten.", "a photo of a truck.", "a photo of a lorry.",
         "Ünïcödé and    odd   spacing!"]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return local_path(MINILM, what="test")


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """transformers' own MiniLM (with its pooler layer) and tokenizer, loaded without open_clip."""
    from transformers import AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(str(minilm_dir), add_pooling_layer=True).eval(),
            AutoTokenizer.from_pretrained(str(minilm_dir)))


def _tiny_bert_dir(root: Path, minilm_dir: Path, *, pooler: bool) -> Path:
    """A small random BERT saved by transformers, with MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(str(root))
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copyfile(minilm_dir / name, root / name)
    return root


@pytest.mark.parametrize("pooler", ["mean", "cls", "pooler"])
def test_minilm_tower_equals_transformers_with_the_same_pooling_and_projection(pooler, reference):
    model_hf, tokenizer_hf = reference
    bundle = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=MINILM, text_pooler=pooler))
    model = bundle.model.eval()
    ids = bundle.tokenizer(TEXTS)
    enc = tokenizer_hf([" ".join(t.split()) for t in TEXTS], padding="max_length", max_length=ids.shape[1],
                       truncation=True, return_tensors="pt")
    assert torch.equal(ids, enc.input_ids)
    with torch.no_grad():
        out = model_hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        mask = enc.attention_mask[..., None].float()
        pooled = {"mean": (out.last_hidden_state * mask).sum(1) / mask.sum(1),
                  "cls": out.last_hidden_state[:, 0], "pooler": out.pooler_output}[pooler]
        expected = pooled @ model.text.proj.weight.T
        got = model.encode_text(ids)
    assert got.shape == (len(TEXTS), 64)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    if pooler == "mean":  # the sentence encoder's own embedding space: real weights, not a random init
        unit = torch.nn.functional.normalize(pooled, dim=-1)
        sim = unit @ unit.T
        assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[2, 0] + 0.1, sim


def test_sentence_transformers_directory_pools_as_configured(minilm_dir):
    bundle = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=str(minilm_dir), text_context_length=16))
    text_cfg = bundle.model_cfg["text_cfg"]
    assert text_cfg["hf_pooler_type"] == "mean_pooler"  # from 1_Pooling/config.json
    assert text_cfg["context_length"] == 16 and bundle.tokenizer(["a cat"]).shape == (1, 16)
    assert text_cfg["hf_model_name"] == str(minilm_dir.resolve())


def test_sentence_transformers_layout_with_a_transformer_subfolder(tmp_path, minilm_dir):
    """The older layout: modules.json points at 0_Transformer/, and 1_Pooling/ asks for the CLS token."""
    root = tmp_path / "st"
    _copy_without_weights_link(minilm_dir, root / "0_Transformer")
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                 "pooling_mode_mean_tokens": False}))
    bundle = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=str(root)))
    assert bundle.model_cfg["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert bundle.model_cfg["text_cfg"]["hf_model_name"] == str((root / "0_Transformer").resolve())
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(UserError, match="pools with max_tokens, which we do not support"):
        build_model(ModelConfig(name="tiny-vit-32", text_pretrained=str(root)))


def test_random_init_keeps_the_architecture_and_tokenizer_but_not_the_weights(minilm_dir):
    pre = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=MINILM)).model.text.transformer.state_dict()
    rnd = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=MINILM, text_random_init=True))
    rnd_sd = rnd.model.text.transformer.state_dict()
    assert rnd_sd.keys() == pre.keys()
    key = "encoder.layer.0.attention.self.query.weight"
    assert rnd_sd[key].shape == pre[key].shape and not torch.allclose(rnd_sd[key], pre[key])


def _copy_without_weights_link(src: Path, dst: Path) -> Path:
    """A throwaway copy of a model directory (weights symlinked, to save the copy)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


def test_checkpoint_of_a_locked_pretrained_tower_loads_without_the_original_directory(tmp_path, minilm_dir,
                                                                                   tiny_overrides):
    from contrastive.checkpoint import load_full_state_dict
    from contrastive.loading import load_for_inference
    from contrastive.train import train

    copy_dir = _copy_without_weights_link(minilm_dir, tmp_path / "minilm")
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.steps=3", "train.checkpoint_every=3", "optim.lr=1e-2",
                                              "optim.warmup_steps=1", f"model.text_pretrained={copy_dir}",
                                              "model.lock_text=true", "model.lock_text_freeze_layer_norm=true",
                                              "model.text_context_length=16", "model.text_pooler=mean",
                                              "model.lock_text_cache_size=1000"])
    train(cfg, run, progress=False)
    shutil.rmtree(copy_dir)

    bundle, info = load_for_inference(run)
    assert info["step"] == 3
    ckpt = Path(info["checkpoint"])
    assert json.loads((ckpt / "model.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == "./text_tower"
    assert not list((ckpt / "text_tower").glob("*.safetensors"))  # the weights live in the checkpoint only
    # Locked weights are the pretrained ones, bit for bit; the projection and the image tower trained.
    state = load_full_state_dict(ckpt)
    original = build_model(ModelConfig(name="tiny-vit-32", text_pretrained=MINILM, text_context_length=16,
                                       text_pooler="mean"))
    for name, value in original.model.state_dict().items():
        if name.startswith("text.transformer."):
            assert torch.equal(state[name], value), name
    assert not torch.allclose(state["text.proj.weight"], original.model.state_dict()["text.proj.weight"])
    # The reloaded model (built from the checkpoint's own copy of config + tokenizer) embeds as the original
    # architecture does with the checkpoint's weights.
    original.model.load_state_dict(state)
    original.model.eval()
    with torch.no_grad():
        assert torch.equal(bundle.tokenizer(TEXTS), original.tokenizer(TEXTS))
        torch.testing.assert_close(bundle.model.encode_text(bundle.tokenizer(TEXTS)),
                                   original.model.encode_text(original.tokenizer(TEXTS)))
    shutil.rmtree(ckpt / "text_tower")
    with pytest.raises(UserError, match="incomplete: its text tower files"):
        load_for_inference(ckpt)


# ---------------------------------------------------------------- timm image towers

def _timm_arch(name: str = "test_resnet") -> dict:
    arch = get_open_clip_config("tiny-vit-32")
    arch["vision_cfg"] = {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "avg",
                          "timm_proj": "linear", "image_size": 32}
    return arch


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_loads_into_the_image_tower(tmp_path, fmt):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = timm.create_model("test_resnet").eval()  # with its 1000-class head, as timm saves it
    path = tmp_path / f"weights.{fmt}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    bundle = build_model(ModelConfig(image_pretrained=str(path)), model_cfg=_timm_arch())
    visual = bundle.model.eval().visual
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(visual.trunk(x), expected)
        assert visual(x).shape == (2, 64)


def test_timm_checkpoint_of_another_architecture_is_one_clear_line(tmp_path):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}, str(path))
    with pytest.raises(UserError, match=r"is not a checkpoint of this image tower \(test_resnet") as e:
        build_model(ModelConfig(image_pretrained=str(path)), model_cfg=_timm_arch())
    assert "\n" not in str(e.value)


def test_timm_bad_files_and_towers(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": object.__new__(_Opaque)}, pickled)
    with pytest.raises(UserError, match="weights-only state dict"):
        build_model(ModelConfig(image_pretrained=str(pickled)), model_cfg=_timm_arch())
    with pytest.raises(UserError, match="is not a file"):
        build_model(ModelConfig(image_pretrained=str(tmp_path / "nope.safetensors")), model_cfg=_timm_arch())
    with pytest.raises(UserError, match="needs a timm image tower"):
        build_model(ModelConfig(name="tiny-vit-32", image_pretrained=str(pickled)))


class _Opaque:  # an arbitrary pickled object: weights-only loading must refuse it
    pass


# ---------------------------------------------------------------- bad text tower inputs

def test_bad_text_tower_directories_are_one_clear_line(tmp_path, minilm_dir):
    def error(**kwargs) -> str:
        with pytest.raises(UserError) as e:
            build_model(ModelConfig(name="tiny-vit-32", **kwargs))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "is not a directory" in error(text_pretrained=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "not a Hugging Face model directory" in error(text_pretrained=str(tmp_path / "empty"))
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    shutil.copyfile(minilm_dir / "config.json", no_tok / "config.json")
    (no_tok / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    assert "has no tokenizer" in error(text_pretrained=str(no_tok))
    assert "is not installed" in error(text_pretrained="pkg:no_such_package_xyz/model")
    # Weights of another architecture than config.json says: 8 layers configured, 6 in the weights.
    other = _copy_without_weights_link(minilm_dir, tmp_path / "other")
    config = json.loads((minilm_dir / "config.json").read_text())
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=8)))
    assert "do not fit its config.json: " in error(text_pretrained=str(other))
    assert "text width (384) to equal the model's embed_dim (64)" in error(text_pretrained=MINILM, text_proj="none")
    assert "exceeds the text model's max_position_embeddings (512)" in error(text_pretrained=MINILM,
                                                                             text_context_length=600)


def test_pooler_choice_needs_pooler_weights(tmp_path, minilm_dir):
    bert = _tiny_bert_dir(tmp_path / "bert", minilm_dir, pooler=False)
    assert build_model(ModelConfig(name="tiny-vit-32", text_pretrained=str(bert), text_pooler="cls")).model is not None
    with pytest.raises(UserError, match="has no pooler weights: use model.text_pooler=cls or mean"):
        build_model(ModelConfig(name="tiny-vit-32", text_pretrained=str(bert), text_pooler="pooler"))


def test_hub_names_are_never_downloaded():
    arch = get_open_clip_config("tiny-vit-32")
    arch["text_cfg"] = {"hf_model_name": "surely-not/a-cached-model", "hf_tokenizer_name": "surely-not/a-cached-model",
                        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}
    with pytest.raises(UserError, match="not a local directory nor in the local Hugging Face cache"):
        build_model(ModelConfig(), model_cfg=arch)


def test_config_keys_are_checked():
    from contrastive.config import ConfigError

    with pytest.raises(ConfigError, match="text_pooler must be one of auto, cls, mean, pooler"):
        load_config(None, ["model.text_pretrained=x", "model.text_pooler=max"])
    with pytest.raises(ConfigError, match="applies to a pretrained text tower"):
        load_config(None, ["model.text_pooler=cls"])
    with pytest.raises(ConfigError, match="has no effect without model.lock_text=true"):
        load_config(None, ["model.lock_text_unlocked_layers=2"])
    with pytest.raises(ConfigError, match="has no effect without model.lock_image=true"):
        load_config(None, ["model.lock_image_freeze_bn_stats=true"])


def test_train_with_a_bad_text_tower_prints_one_line(tmp_path, capsys, monkeypatch, tiny_overrides):
    from contrastive.cli import main

    monkeypatch.chdir(REPO)
    code = main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "run"), *tiny_overrides,
                 f"model.text_pretrained={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a Hugging Face model directory" in err and len(err.splitlines()) == 1


def test_assets_round_trip(tmp_path, minilm_dir):
    from contrastive.pretrained import resolve_model_assets, save_model_assets

    arch = {"embed_dim": 8, "text_cfg": {"hf_model_name": str(minilm_dir), "hf_tokenizer_name": str(minilm_dir)}}
    saved = save_model_assets(arch, tmp_path)
    assert saved["text_cfg"]["hf_model_name"] == "./text_tower" and arch["text_cfg"]["hf_model_name"] == str(minilm_dir)
    copied = sorted(p.name for p in (tmp_path / "text_tower").iterdir())
    assert copied == sorted(["config.json"] + [f for f in TOKENIZER_FILES if (minilm_dir / f).is_file()])
    resolved = resolve_model_assets(saved, tmp_path)
    assert resolved["text_cfg"]["hf_model_name"] == str((tmp_path / "text_tower").resolve())
    native = {"embed_dim": 8, "text_cfg": {"width": 8}}
    assert save_model_assets(native, tmp_path) == native and resolve_model_assets(native, tmp_path) == native
