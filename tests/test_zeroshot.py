import json

import numpy as np
import pytest
import torch
from torch import nn

from contrastive.errors import UserError
from contrastive.eval.zeroshot import classification_metrics, evaluate, load_templates


def test_metrics_on_hand_built_logits():
    # 6 images, 5 classes; rows are logits.
    logits = torch.tensor([
        [9, 1, 0, 0, 0],   # label 0, top1 right
        [1, 9, 0, 0, 0],   # label 1, right
        [9, 8, 7, 6, 5],   # label 2, top1 wrong (pred 0), in top5
        [0, 0, 0, 9, 0],   # label 3, right
        [0, 0, 0, 9, 1],   # label 4, wrong (pred 3), in top5
        [9, 0, 0, 0, 1],   # label 0, right
    ], dtype=torch.float)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    m = classification_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(4 / 6)
    assert m["acc5"] == pytest.approx(1.0)
    # per-class recall: c0 2/2, c1 1/1, c2 0/1, c3 1/1, c4 0/1 -> mean 3/5
    assert m["mean_per_class_recall"] == pytest.approx(3 / 5)


def test_no_acc5_with_fewer_than_five_classes():
    m = classification_metrics(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1]))
    assert "acc5" not in m and m["acc1"] == 0.5 and m["mean_per_class_recall"] == 0.5


class _ColourModel(nn.Module):
    """Images: mean RGB as the embedding. Texts: one-hot of the colour word they contain."""

    COLOURS = ["red", "green", "blue"]

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, x, normalize=False):
        f = x.mean(dim=(2, 3))
        return nn.functional.normalize(f, dim=-1)

    def encode_text(self, tokens, normalize=False):
        return nn.functional.normalize(tokens.float(), dim=-1)

    def forward(self, image=None, text=None):  # open_clip's contract, which evaluation goes through
        return {"image_features": None if image is None else self.encode_image(image),
                "text_features": None if text is None else self.encode_text(text)}


def _tokenize(texts):
    return torch.tensor([[float(c in t) for c in _ColourModel.COLOURS] for t in texts])


def test_evaluate_end_to_end_on_a_known_answer(tmp_path):
    from PIL import Image

    from contrastive.eval.zeroshot import LabelledImages

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), rgb).save(tmp_path / name / f"{i}.png")
    (tmp_path / "blue" / "broken.png").write_bytes(b"not an image")
    images = LabelledImages(str(tmp_path))
    assert images.classes == ["blue", "green", "red"]
    import torchvision.transforms.functional as TF

    out = evaluate(_ColourModel(), TF.to_tensor, _tokenize, images, ["a {c} thing"], batch_size=4)
    assert out["metrics"]["acc1"] == 1.0 and out["num_images"] == 9 and out["num_skipped"] == 1


def test_templates_need_the_placeholder(tmp_path):
    assert len(load_templates("cifar")) == 18
    assert load_templates(["cifar"]) == load_templates("cifar")  # as a config's `templates: cifar` arrives
    assert len(load_templates("imagenet")) == 80
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}\n")
    with pytest.raises(UserError, match="no \\{c\\} placeholder"):
        load_templates(str(bad))


# ---------------------------------------------------------------- class names, templates, CLIP_benchmark sets

def test_classnames_and_templates_from_clip_benchmark_json(tmp_path):
    from contrastive.eval.zeroshot import load_classnames

    names = tmp_path / "en_classnames.json"
    names.write_text(json.dumps({"cifar10": ["airplane", "car"], "mnist": ["0", "1"]}))
    assert load_classnames(names, dataset="cifar10") == ["airplane", "car"]
    with pytest.raises(UserError, match="several datasets"):
        load_classnames(names)
    templates = tmp_path / "en_zeroshot_classification_templates.json"
    templates.write_text(json.dumps({"cifar10": ["a photo of a {c}.", "a blurry photo of a {c}."],
                                     "mnist": ['a photo of the number: "{c}".']}))
    assert load_templates(str(templates), dataset="mnist") == ['a photo of the number: "{c}".']
    templates.write_text(json.dumps(["a {c}", "no placeholder"]))
    with pytest.raises(UserError, match="no \\{c\\} placeholder"):
        load_templates(str(templates))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="template list is empty"):
        load_templates(str(tmp_path / "empty.txt"))


def test_per_class_prompt_lists(tmp_path):
    """CuPL-style {class: [prompts]}: each class is the mean of its own prompts, which need no {c}."""
    from contrastive.eval.zeroshot import class_embeddings

    path = tmp_path / "cupl.json"
    path.write_text(json.dumps({"red": ["something red", "a red thing"], "blue": ["the blue one"],
                                "green": ["green"]}))
    prompts = load_templates(str(path), classes=["blue", "green", "red"])
    assert prompts == {"blue": ["the blue one"], "green": ["green"], "red": ["something red", "a red thing"]}
    weights = class_embeddings(_ColourModel(), _tokenize, ["blue", "green", "red"], prompts)
    assert torch.allclose(weights, torch.eye(3)[[2, 1, 0]])  # _ColourModel's text axes: red, green, blue
    with pytest.raises(UserError, match="no prompts for classes \\['purple'\\]"):
        load_templates(str(path), classes=["red", "purple"])


def _clip_benchmark_set(root, colours):
    """CLIP_benchmark's WebDataset layout: test/nshards.txt, test/0.tar (webp + cls), classnames, templates."""
    import io

    import webdataset as wds
    from PIL import Image

    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        for i, (name, rgb) in enumerate(colours.items()):
            for j in range(2):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), rgb).save(buf, format="WEBP", lossless=True)
                sink.write({"__key__": f"s{i}{j}", "webp": buf.getvalue(), "cls": str(i).encode()})
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(colours) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} thing\nsomething {c}\n")


def test_clip_benchmark_webdataset_folder(tmp_path):
    import torchvision.transforms.functional as TF

    from contrastive.eval.zeroshot import LabelledImages, resolve_data

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    _clip_benchmark_set(tmp_path / "wds_colours", colours)
    spec, found = resolve_data(str(tmp_path / "wds_colours"))
    assert spec == str(tmp_path / "wds_colours" / "test" / "0.tar")
    assert found == {"classnames": list(colours), "templates": ["a {c} thing", "something {c}"]}
    images = LabelledImages(spec, classes=found["classnames"])
    out = evaluate(_ColourModel(), TF.to_tensor, _tokenize, images, found["templates"], batch_size=4)
    assert out["metrics"]["acc1"] == 1.0 and out["num_images"] == 6
    with pytest.raises(UserError, match="no split 'train'"):
        resolve_data(str(tmp_path / "wds_colours"), split="train")


def test_predict_gives_softmax_probabilities_of_the_model_scale(tmp_path):
    from types import SimpleNamespace

    import torchvision.transforms.functional as TF
    from PIL import Image

    from contrastive.eval.zeroshot import predict

    model = _ColourModel()
    model.logit_scale = nn.Parameter(torch.tensor([2.0]))  # exp(2) ~ 7.39
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    bundle = SimpleNamespace(model=model, tokenizer=_tokenize, preprocess_val=TF.to_tensor)
    (result,) = predict(bundle, [str(tmp_path / "blue.png")], ["red", "green", "blue"], ["a {c} thing"], top_k=2)
    scale = float(np.exp(2.0))
    expected = np.exp([scale, 0.0, 0.0]) / np.exp([scale, 0.0, 0.0]).sum()
    assert [p["label"] for p in result["predictions"]] == ["blue", "green"] or \
        [p["label"] for p in result["predictions"]] == ["blue", "red"]
    assert result["predictions"][0]["prob"] == pytest.approx(expected[0], rel=1e-5)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UserError, match="broken.jpg cannot be read"):
        predict(bundle, [str(tmp_path / "blue.png"), str(tmp_path / "broken.jpg")], ["red", "blue"], ["{c}"])


def test_confusion_matrix_counts():
    from contrastive.eval.plots import confusion_matrix

    m = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_zeroshot_command_line_on_a_clip_benchmark_set(tmp_path, capsys):
    from contrastive.cli import main
    from tests.test_search import save_random_model

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255),
               "black": (0, 0, 0)}
    _clip_benchmark_set(tmp_path / "set", colours)
    model = save_random_model(tmp_path / "model", "tiny-vit-32")
    out = tmp_path / "zs.json"
    code = main(["zeroshot", "--model", str(model), "--data", str(tmp_path / "set"), "--output", str(out),
                 "--confusion-matrix", str(tmp_path / "cm.png")])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["classes"] == list(colours) and result["num_images"] == 10
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert np.array(result["confusion_matrix"]).sum() == 10 and (tmp_path / "cm.png").stat().st_size > 0
    # The same folder's labels for single images.
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    capsys.readouterr()
    code = main(["zeroshot", "--model", str(model), "--classnames", str(tmp_path / "set" / "classnames.txt"),
                 "--predict", str(tmp_path / "a.png"), "--top-k", "3"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith(f"{tmp_path / 'a.png'}: ") and printed.count(",") == 2
    probs = [float(part.split()[-1]) for part in printed.split(": ", 1)[1].split(",")]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-3
    # An exported open_clip directory of the same weights predicts the same.
    from contrastive.export import export

    export(model, "open_clip", tmp_path / "oc", check=False, progress=False)
    code = main(["zeroshot", "--model", str(tmp_path / "oc"), "--classnames", str(tmp_path / "set" / "classnames.txt"),
                 "--predict", str(tmp_path / "a.png"), "--top-k", "3"])
    assert code == 0 and capsys.readouterr().out == printed
    (tmp_path / "bad.png").write_bytes(b"nope")
    code = main(["zeroshot", "--model", str(model), "--classes", "a,b", "--predict", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "bad.png cannot be read" in err and len(err.splitlines()) == 1
