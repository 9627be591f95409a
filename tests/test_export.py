"""`contrastive export`: each format is loaded back by the tool it is for and compared with the model it came from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from contrastive.cli import main
from contrastive.config import load_config, to_dict
from contrastive.errors import UserError
from contrastive.models import build_model

CAPTIONS = ["a red circle", "A big BLUE square in the top-left corner!", "there's a  star, isn't it?",
            "café, naïve & 123 shapes", "a small green hexagon near the bottom right " * 4]


def make_run(root: Path, data: dict, *, name: str = "run", overrides=(), step: int = 7, seed: int = 0):
    """A run directory with one consolidated checkpoint (model.safetensors), as training leaves it, plus an
    evaluator record; weights are moved off their init so that a wrong mapping cannot pass by symmetry."""
    from safetensors.torch import save_file

    cfg = load_config(None, [f"data.train={data['train']}", f"data.val={data['val']}", "model.name=tiny-vit-32",
                             "train.batch_size=32", *overrides])
    torch.manual_seed(seed)
    bundle = build_model(cfg.model)
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = root / name
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "model.json").write_text(json.dumps({"model_cfg": bundle.model_cfg, "preprocess_cfg": bundle.preprocess_cfg}))
    (ckpt / "state.json").write_text(json.dumps({"step": step, "zero_stage": 0, "world_size": 1}))
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (ckpt / "config.yaml").write_text(config_yaml)
    (run / "config.yaml").write_text(config_yaml)
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 2.5, "zeroshot_color/acc1": 0.625}) + "\n")
    bundle.model.eval()
    return run, bundle


def val_batch(data: dict, preprocess, n: int = 16):
    from contrastive.data import decode_image, eval_samples

    samples = [s for _, s in zip(range(n), eval_samples(data["val"]))]
    images = torch.stack([preprocess(decode_image(s["jpg"])) for s in samples])
    return images, [s["txt"].decode() for s in samples], samples


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data):
    return make_run(tmp_path_factory.mktemp("export"), synthetic_data)


def export_cli(*args) -> int:
    return main(["export", *map(str, args)])


def max_diff(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def zero_shot(model, preprocess, tokenizer, data) -> dict:
    from contrastive.eval.zeroshot import LabelledImages, evaluate

    images = LabelledImages(data["val"], label_field="color")
    return evaluate(model, preprocess, tokenizer, images, ["a {c} shape", "something {c}"], batch_size=64)


# ---------------------------------------------------------------- open_clip

def assert_open_clip_export_matches(out: Path, bundle, data, *, tol: float) -> None:
    """open_clip loads `out` with local-dir: alone and computes our model's embeddings and zero-shot answers."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    images, captions, samples = val_batch(data, preprocess)
    ours_images, _, _ = val_batch(data, bundle.preprocess_val)
    assert max_diff(images, ours_images) == 0.0  # the same evaluation transform
    assert torch.equal(tokenizer(captions + CAPTIONS), bundle.tokenizer(captions + CAPTIONS))
    with torch.no_grad():
        assert max_diff(model.encode_image(images), bundle.model.encode_image(images)) < tol
        tokens = tokenizer(captions + CAPTIONS)
        assert max_diff(model.encode_text(tokens), bundle.model.encode_text(tokens)) < tol
    theirs, ours = zero_shot(model, preprocess, tokenizer, data), zero_shot(bundle.model, bundle.preprocess_val,
                                                                           bundle.tokenizer, data)
    assert ours["num_images"] == theirs["num_images"] == 128
    assert torch.equal(theirs["logits"].argmax(1), ours["logits"].argmax(1))
    assert theirs["metrics"] == pytest.approx(ours["metrics"])


def test_open_clip_export_loads_through_local_dir_with_the_same_embeddings(run, synthetic_data, tmp_path):
    from safetensors import safe_open

    run_dir, bundle = run
    out = tmp_path / "oc"
    assert export_cli("--model", run_dir, "--format", "open_clip", "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert "nonscalar_logit_scale" not in cfg["model_cfg"] and cfg["preprocess_cfg"]["size"] == 32
    with safe_open(str(out / "open_clip_model.safetensors"), "pt") as f:
        assert f.get_tensor("logit_scale").shape == ()  # open_clip's own layout
        assert f.get_tensor("visual.proj").dtype == torch.float32
    assert_open_clip_export_matches(out, bundle, synthetic_data, tol=1e-5)
    summary = json.loads((out / "export.json").read_text())
    assert summary["check_max_abs_diff"] < 1e-5 and summary["training_state"]["step"] == 7


def test_bf16_open_clip_export_stores_bf16_and_stays_close(run, synthetic_data, tmp_path):
    import open_clip
    from safetensors import safe_open

    run_dir, bundle = run
    out = tmp_path / "oc16"
    assert export_cli("--model", run_dir, "--format", "open_clip", "--out", out, "--dtype", "bf16", "--no-check") == 0
    with safe_open(str(out / "open_clip_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    images, captions, _ = val_batch(synthetic_data, preprocess)
    with torch.no_grad():
        diff = max_diff(model.eval().encode_image(images, normalize=True),
                        bundle.model.encode_image(images, normalize=True))
    assert 0 < diff < 3e-2  # rounded, but the same model


def test_load_for_inference_and_reexport_accept_an_open_clip_export(run, tmp_path):
    from contrastive.loading import load_for_inference

    run_dir, bundle = run
    out = tmp_path / "oc"
    assert export_cli("--model", run_dir, "--format", "open_clip", "--out", out, "--no-check") == 0
    loaded, info = load_for_inference(out)
    assert info["step"] == 7 and loaded.model.logit_scale.shape == (1,)
    tokens = bundle.tokenizer(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tokens), bundle.model.encode_text(tokens))
    # An export is itself a source: open_clip -> transformers keeps the weights.
    assert export_cli("--model", out, "--format", "hf", "--out", tmp_path / "hf", "--no-check") == 0
    assert "step 7" in (tmp_path / "hf" / "README.md").read_text()


# ---------------------------------------------------------------- transformers

@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_export_loads_in_clipmodel_with_the_same_embeddings_and_logits(synthetic_data, tmp_path, quick_gelu):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    run_dir, bundle = make_run(tmp_path, synthetic_data, overrides=[f"model.force_quick_gelu={quick_gelu}"])
    out = tmp_path / "hf"
    # The built-in check (load back, compare) runs once; this test compares by itself.
    assert export_cli("--model", run_dir, "--format", "hf", "--out", out, *([] if quick_gelu else ["--no-check"])) == 0
    if quick_gelu:
        assert json.loads((out / "export.json").read_text())["check_max_abs_diff"] < 1e-5
    model = CLIPModel.from_pretrained(str(out)).eval()
    processor = CLIPProcessor.from_pretrained(str(out))
    assert model.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")

    images, captions, samples = val_batch(synthetic_data, bundle.preprocess_val)
    texts = captions + CAPTIONS
    enc = processor(text=texts, padding="max_length", truncation=True, return_tensors="pt")
    ours_ids = bundle.tokenizer(texts)
    real = ours_ids != 0  # open_clip pads with 0, CLIPTokenizer with <|endoftext|>; both read the first one
    assert enc["input_ids"].shape == ours_ids.shape and torch.equal(enc["input_ids"][real], ours_ids[real])

    # The processor does open_clip's evaluation transform: exactly for images at the model's size.
    pil = [Image.open(__import__("io").BytesIO(s["jpg"])).convert("RGB") for s in samples]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    assert max_diff(pixels, images) < 1e-5
    big = Image.fromarray((np.random.default_rng(0).random((80, 120, 3)) * 255).astype("uint8"))
    assert max_diff(processor(images=[big], return_tensors="pt")["pixel_values"][0], bundle.preprocess_val(big)) < 0.05

    with torch.no_grad():
        out_hf = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=images)
        img = bundle.model.encode_image(images, normalize=True)
        txt = bundle.model.encode_text(ours_ids, normalize=True)
        logits = bundle.model.logit_scale.exp() * img @ txt.T
    assert max_diff(out_hf.image_embeds, img) < 1e-4 and max_diff(out_hf.text_embeds, txt) < 1e-4
    assert max_diff(out_hf.logits_per_image, logits) < 1e-4
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "CLIPModel.from_pretrained" in card


@pytest.mark.parametrize("change, reason", [
    ({"init_logit_bias": -10.0}, "logit bias"),
    ({"vision_cfg": {"ls_init_value": 1e-4}}, "LayerScale"),
    ({"vision_cfg": {"attentional_pool": True}}, "attention"),
    ({"vision_cfg": {"pool_type": "avg"}}, "pools 'avg'"),
    ({"vision_cfg": {"layers": [1, 1, 1, 1], "width": 32}}, "ModifiedResNet"),
    ({"vision_cfg": {"timm_model_name": "vit_tiny_patch16_224"}}, "timm"),
    ({"vision_cfg": {"qk_norm": True}}, "custom attention"),
    ({"text_cfg": {"no_causal_mask": True}}, "not causal"),
    ({"text_cfg": {"proj_bias": True}}, "bias-free"),
    ({"text_cfg": {"pool_type": "last"}}, "pools 'last'"),
    ({"text_cfg": {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": "bert-base-uncased"}}, "Hugging Face"),
])
def test_architectures_clipmodel_cannot_hold_are_refused_with_the_reason(change, reason):
    from contrastive.hf_export import NotRepresentable, check_representable
    from contrastive.models import get_open_clip_config

    cfg = get_open_clip_config("tiny-vit-32")
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    with pytest.raises(NotRepresentable, match=reason) as err:
        check_representable(cfg, {})
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)
    check_representable(get_open_clip_config("tiny-vit-32"), {})  # the plain ViT passes


def test_hf_tokenizer_gives_open_clip_ids_without_padding():
    import open_clip

    from contrastive.hf_export import build_tokenizer

    hf = build_tokenizer(77)
    ours = open_clip.get_tokenizer("ViT-B-32")
    # Clean text. open_clip also runs ftfy.fix_text and html.unescape first ("&amp;", mojibake, ligatures),
    # which CLIPTokenizer does not: the model card says to clean raw web text before tokenizing.
    for text in CAPTIONS + ["", "  leading and trailing  ", "UPPER Ünï", "emoji 🙂 and tabs\tand\nnewlines",
                            "1,000.5 $ % #hash"]:
        ids = ours([text])[0]
        assert hf(text)["input_ids"] == ids[: int((ids != 0).sum())].tolist(), text


# ---------------------------------------------------------------- embeddings and ONNX

def test_embeddings_export_equals_the_model_and_lines_up_with_metadata(run, synthetic_data, tmp_path):
    from contrastive.data import eval_samples
    from contrastive.eval.embed import read_embeddings

    run_dir, bundle = run
    out = tmp_path / "emb"
    assert export_cli("--model", run_dir, "--format", "embeddings", "--out", out, "--data", synthetic_data["val"],
                      "--batch-size", 24, "--rows-per-file", 50) == 0
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir())[-1] == "metadata_2.parquet"
    img, txt, meta = read_embeddings(out)
    assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (128, 64)
    assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)

    samples = list(eval_samples(synthetic_data["val"]))
    assert meta["image_path"].tolist() == [s["__key__"] for s in samples]
    assert meta["caption"].tolist() == [s["txt"].decode() for s in samples]
    assert meta["color"].tolist() == [json.loads(s["json"])["color"] for s in samples]
    images, captions, _ = val_batch(synthetic_data, bundle.preprocess_val, n=128)
    with torch.no_grad():
        assert max_diff(img, bundle.model.encode_image(images, normalize=True)) < 2e-3  # float16 rounding
        assert max_diff(txt, bundle.model.encode_text(bundle.tokenizer(captions), normalize=True)) < 2e-3
    assert "128 samples" in (out / "README.md").read_text()


def test_onnx_export_matches_pytorch_at_any_batch_size(run, tmp_path):
    import onnxruntime as ort

    run_dir, bundle = run
    out = tmp_path / "onnx"
    assert export_cli("--model", run_dir, "--format", "onnx", "--out", out) == 0
    image_session = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["image_encoder"]["input_shape"] == ["batch", 3, 32, 32]
    for n in (1, 5):
        images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        tokens = bundle.tokenizer(CAPTIONS[:n])
        with torch.no_grad():
            assert max_diff(image_session.run(None, {"pixel_values": images.numpy()})[0],
                            bundle.model.encode_image(images, normalize=True)) < 1e-5
            assert max_diff(text_session.run(None, {"input_ids": tokens.numpy()})[0],
                            bundle.model.encode_text(tokens, normalize=True)) < 1e-5
    # tokenizer.json beside the graphs gives the same ids with the tokenizers library alone
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(CAPTIONS[1]).ids
    assert ids == bundle.tokenizer([CAPTIONS[1]])[0][: len(ids)].tolist()


def test_fp16_onnx_export_is_checked_with_onnxruntime(run, tmp_path):
    import onnx

    out = tmp_path / "onnx16"
    assert export_cli("--model", run[0], "--format", "onnx", "--out", out, "--dtype", "fp16") == 0
    graph = onnx.load(str(out / "image_encoder.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert 0 < json.loads((out / "export.json").read_text())["check_max_abs_diff"] < 5e-3


# ---------------------------------------------------------------- bad input

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_run_without_checkpoints_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    assert export_cli("--model", tmp_path / "run", "--format", "open_clip", "--out", tmp_path / "o") == 2
    assert "without checkpoints" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_an_unknown_format_is_refused(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_cli("--model", run[0], "--format", "tflite", "--out", tmp_path / "o")
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown export format"):
        from contrastive.export import export

        export(run[0], "tflite", tmp_path / "o")


def test_an_architecture_clipmodel_cannot_hold_is_refused_before_writing(synthetic_data, tmp_path, capsys):
    run_dir, _ = make_run(tmp_path, synthetic_data, overrides=["model.init_logit_bias=-10"])
    assert export_cli("--model", run_dir, "--format", "hf", "--out", tmp_path / "hf") == 2
    assert "learned logit bias" in one_line_error(capsys)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_a_non_empty_out_is_kept_unless_overwrite(run, tmp_path, capsys):
    import socket
    import subprocess

    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".o.incoming-{socket.gethostname()}-{dead.pid}"  # left by a killed export
    stale.mkdir()
    assert export_cli("--model", run[0], "--format", "onnx", "--out", out) == 2
    assert "not empty" in one_line_error(capsys) and (out / "precious.txt").read_text() == "keep me"
    # A failing export with --overwrite leaves the old contents too (embeddings without --data fails).
    assert export_cli("--model", run[0], "--format", "embeddings", "--out", out, "--overwrite") == 2
    assert "--data" in one_line_error(capsys) and (out / "precious.txt").is_file()
    assert export_cli("--model", run[0], "--format", "onnx", "--out", out, "--overwrite", "--no-check") == 0
    assert not (out / "precious.txt").exists() and (out / "image_encoder.onnx").is_file()
    assert not list(tmp_path.glob(".o.*"))  # no staging or replaced folders left behind, stale ones removed
    # --overwrite never deletes the model being exported
    assert export_cli("--model", run[0], "--format", "open_clip", "--out", tmp_path / "ocsrc", "--no-check") == 0
    assert export_cli("--model", tmp_path / "ocsrc", "--format", "open_clip", "--out", tmp_path / "ocsrc",
                      "--overwrite") == 2
    assert "holds the model" in one_line_error(capsys) and (tmp_path / "ocsrc" / "open_clip_model.safetensors").is_file()


# ---------------------------------------------------------------- model card

def test_model_card_has_architecture_data_samples_config_and_evals(run, synthetic_data, tmp_path):
    run_dir, _ = run
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "cifar.json").write_text(json.dumps(
        {"dataset": "cifar10", "task": "zeroshot_classification", "metrics": {"acc1": 0.4375}}))
    out = tmp_path / "oc"
    assert export_cli("--model", run_dir, "--format", "open_clip", "--out", out, "--no-check") == 0
    card = (out / "README.md").read_text()
    for section in ("## Architecture", "## Training data", "## Training", "## Evaluation", "## Resolved training config"):
        assert section in card
    assert "ViT: 2 layers, width 64" in card and "context length | 32" in card
    assert "samples seen: 224" in card  # 7 steps x global batch 32
    assert f"shards: `{synthetic_data['train']}`" in card
    assert "| metrics.jsonl | zeroshot_color/acc1 | 0.6250 | 7 |" in card
    assert "cifar10" in card and "0.4375" in card
    assert "batch_size: 32" in card and "library_name: open_clip" in card
    assert 'create_model_and_transforms("local-dir:' in card


# ---------------------------------------------------------------- ZeRO-3

def _train_zero3_then_gather(rank, world_size, overrides, run_dir):
    """Train under ZeRO-3, then rebuild a fresh ZeRO-3 engine from the checkpoint through DeepSpeed's own
    resume path and gather its full parameters: a reference that does not go through zero_to_fp32."""
    import deepspeed

    from contrastive import checkpoint
    from contrastive.distributed import WorldInfo
    from contrastive.engine import build_engine
    from contrastive.train import train

    cfg = load_config(None, overrides)
    train(cfg, Path(run_dir), progress=False)
    bundle = build_model(cfg.model)
    engine, _ = build_engine(bundle.model, cfg, WorldInfo(rank, world_size), lambda s: 1.0)
    checkpoint.load_checkpoint(engine, checkpoint.resolve_checkpoint(Path(run_dir), "latest"), rank=rank)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return weights if rank == 0 else None


@pytest.mark.slow
def test_zero3_two_rank_checkpoint_exports_to_open_clip(tiny_overrides, synthetic_data, tmp_path):
    from tests.dist import run_ranks

    run_dir = tmp_path / "zero3"
    overrides = [o for o in tiny_overrides if not o.startswith(("train.steps", "train.checkpoint_every"))]
    overrides += ["deepspeed.zero_stage=3", "train.steps=4", "train.checkpoint_every=4", "optim.lr=2e-3"]
    gathered = run_ranks(_train_zero3_then_gather, world_size=2, args=(overrides, str(run_dir)),
                         env={"DS_ACCELERATOR": "cpu"}, timeout_s=300)[0]
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # really sharded over the two ranks

    out = tmp_path / "oc"
    assert export_cli("--model", run_dir, "--format", "open_clip", "--out", out) == 0
    reference = build_model(load_config(None, overrides).model)
    reference.model.load_state_dict(gathered)
    reference.model.eval()
    torch.manual_seed(load_config(None, overrides).train.seed)  # as train() seeds its initial weights
    init = build_model(load_config(None, overrides).model).model.state_dict()
    assert max_diff(gathered["visual.proj"], init["visual.proj"]) > 0  # training moved the weights
    assert_open_clip_export_matches(out, reference, synthetic_data, tol=1e-5)
    assert "zero stage: 3" in (out / "README.md").read_text()


def test_custom_text_clip_maps_to_clipmodel_too(tmp_path):
    """open_clip's CustomTextCLIP with its built-in text transformer keeps text weights under `text.`."""
    from transformers import CLIPModel

    from contrastive.config import ModelConfig
    from contrastive.export import open_clip_layout
    from contrastive.hf_export import write_hf
    from contrastive.models import get_open_clip_config

    cfg = dict(get_open_clip_config("tiny-vit-32"), custom_text=True)
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="custom"), model_cfg=cfg)
    assert any(k.startswith("text.transformer.") for k in bundle.model.state_dict())
    write_hf(open_clip_layout(bundle.model.state_dict()), bundle.model_cfg, bundle.preprocess_cfg, tmp_path)
    model = CLIPModel.from_pretrained(str(tmp_path)).eval()
    tokens = bundle.tokenizer(CAPTIONS)
    with torch.no_grad():
        theirs = model.get_text_features(input_ids=tokens)
        theirs = getattr(theirs, "pooler_output", theirs)
        assert max_diff(theirs, bundle.model.eval().encode_text(tokens)) < 1e-4
