import json

import pytest
import torch
from torch import nn

from contrastive.errors import UserError
from eval.zeroshot import classification_metrics, evaluate, load_templates


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


def _tokenize(texts):
    return torch.tensor([[float(c in t) for c in _ColourModel.COLOURS] for t in texts])


def test_evaluate_end_to_end_on_a_known_answer(tmp_path):
    from PIL import Image

    from eval.zeroshot import LabelledImages

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
    assert len(load_templates("imagenet")) == 80
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}\n")
    with pytest.raises(UserError, match="no \\{c\\} placeholder"):
        load_templates(str(bad))
