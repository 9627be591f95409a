"""model.pretrained: both towers from a trained CLIP (open_clip checkpoint file, open_clip local-dir folder, our
export, our run), checked against the source model's own embeddings; fine-tuning from it with frozen towers and
the tiled loss; a source of another architecture is one line naming the first tensor that differs."""
from __future__ import annotations

import json

import pytest
import torch

from contrastive.config import load_config
from contrastive.errors import UserError
from contrastive.export import export
from contrastive.loading import build_initialised, load_for_inference
from contrastive.models import build_model
from tests.conftest import REPO
from tests.test_export import make_run, val_batch


def _encode(bundle, images, texts):
    model = bundle.model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(bundle.tokenizer(texts))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, synthetic_data):
    """A run of each architecture, its open_clip export, and open_clip_train-style checkpoint files of it."""
    root = tmp_path_factory.mktemp("pretrained_init")
    out = {}
    for name in ("tiny-vit-32", "demo-convnet"):
        run, _ = make_run(root, synthetic_data, name=name, overrides=[f"model.name={name}"], seed=1)
        exported = export(run, "open_clip", root / f"{name}-export")
        sd = load_for_inference(run)[0].model.state_dict()
        epoch_file = root / f"{name}-epoch_3.pt"  # open_clip_train's layout: DDP-prefixed state dict plus extras
        torch.save({"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, epoch_file)
        out[name] = {"run": run, "export": exported["out"], "epoch_file": epoch_file}
    return out


@pytest.mark.parametrize("name", ["tiny-vit-32", "demo-convnet"])
@pytest.mark.parametrize("kind", ["export", "local-dir", "run", "epoch_file"])
def test_initialised_model_has_the_sources_embeddings(sources, synthetic_data, name, kind):
    src = sources[name]
    spec = {"export": src["export"], "local-dir": f"local-dir:{src['export']}", "run": src["run"],
            "epoch_file": src["epoch_file"]}[kind]
    cfg = load_config(None, [f"data.train={synthetic_data['train']}", f"model.name={name}", f"model.pretrained={spec}"])
    ours = build_initialised(cfg.model)
    reference, _ = load_for_inference(src["export"])  # the exported model, rebuilt by another path
    images, texts, _ = val_batch(synthetic_data, reference.preprocess_val)
    for a, b in zip(_encode(ours, images, texts), _encode(reference, images, texts)):
        assert torch.equal(a, b)
    assert json.dumps(ours.preprocess_cfg) == json.dumps(reference.preprocess_cfg)  # tuples and lists alike
    random_init = build_model(load_config(None, [f"model.name={name}"]).model)
    assert not torch.equal(_encode(random_init, images, texts)[0], _encode(reference, images, texts)[0])


def test_fine_tuning_from_an_export_with_a_frozen_image_tower_and_the_tiled_loss(sources, tiny_overrides, tmp_path):
    from contrastive.train import train

    exported = sources["tiny-vit-32"]["export"]
    cfg = load_config(None, [*tiny_overrides, f"model.pretrained={exported}", "optim.freeze=[^visual\\.]",
                             "loss.name=infonce_tiled", "loss.tile_size=8", "train.steps=4"])
    train(cfg, tmp_path / "run", progress=False)
    before = load_for_inference(exported)[0].model.state_dict()
    after = load_for_inference(tmp_path / "run")[0].model.state_dict()
    assert after.keys() == before.keys()
    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if not k.startswith("visual.") and before[k].is_floating_point() and k != "logit_scale"]
    assert visual and all(torch.equal(after[k], before[k]) for k in visual)  # frozen: still the export's
    assert any(not torch.equal(after[k], before[k]) for k in text)  # and the rest trained
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_another_architecture_is_refused_naming_the_first_tensor_that_differs(sources, synthetic_data):
    exported = sources["tiny-vit-32"]["export"]
    here = build_model(load_config(None, ["model.name=demo-vit-48"]).model).model.state_dict()
    there = load_for_inference(exported)[0].model.state_dict()
    first = next(k for k in here if k not in there or here[k].shape != there[k].shape)
    cfg = load_config(None, ["model.name=demo-vit-48", f"model.pretrained={exported}"])
    with pytest.raises(UserError) as e:
        build_initialised(cfg.model)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and f": {first} is " in message and "model.name=demo-vit-48" in message


def test_cli_prints_one_line_for_a_source_that_is_not_a_model(tmp_path, capsys, tiny_overrides):
    from contrastive.cli import main

    (tmp_path / "notes.txt").write_text("not weights")
    cases = ((tmp_path, "is not an open_clip checkpoint file"),
             (tmp_path / "notes.txt", "not a safetensors file or a weights-only state dict"))
    for i, (spec, expected) in enumerate(cases):  # a run directory each: a used one is refused (issue 19)
        code = main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(tmp_path / f"run{i}"),
                     *tiny_overrides, f"model.pretrained={spec}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1


def test_config_refuses_contradictions():
    from contrastive.config import ConfigError

    with pytest.raises(ConfigError, match="drop model.image_pretrained"):
        load_config(None, ["model.pretrained=x", "model.image_pretrained=y"])
