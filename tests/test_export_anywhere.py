"""Exports of our conv-tower models load where our package is absent: in a fresh interpreter (`python -I`, cwd
outside the repository) in which `contrastive` (and, for the transformers export, timm and open_clip too) cannot be
imported, the open_clip export loads with open_clip and the export's own trunk file, the transformers export with
AutoModel(trust_remote_code=True), and CLIP_benchmark's CLI classifies a folder dataset with the open_clip export.
Each is compared with our own model: embeddings within 1e-5, CLIP_benchmark's accuracy equal to our evaluator's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contrastive.export import export
from tests.test_export import CAPTIONS, make_run

# Runs a script with some installed top-level packages invisible, as if they were not installed: every finder on
# sys.meta_path (the editable install's among them) answers "not found" for them. find_spec returns None, so
# libraries that probe for optional packages see them as absent too.
RUNNER = '''
import importlib.util, runpy, sys
hidden = set(sys.argv[1].split(","))

class Hiding:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

assert not hidden & set(sys.modules), sorted(hidden & set(sys.modules))
sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
for name in hidden:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is still importable")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# Run after the model card's own snippet (which defines `model` and `tokenizer` or `processor`), on our inputs.
SNIPPET_INPUTS = '''
import sys
from PIL import Image
image = Image.new("RGB", (64, 48), (200, 30, 30))
'''

OPEN_CLIP_CHECK = '''
import json
import torch
ref = torch.load(sys.argv[1], weights_only=True)
model.eval()
with torch.no_grad():
    image = model.encode_image(ref["images"], normalize=True)
    text = model.encode_text(tokenizer(ref["captions"]), normalize=True)
print(json.dumps({"image": (image - ref["image"]).abs().max().item(), "text": (text - ref["text"]).abs().max().item(),
                  "tokens": torch.equal(tokenizer(ref["captions"]), ref["tokens"])}))
'''

HF_CHECK = '''
import json
import torch
ref = torch.load(sys.argv[1], weights_only=True)
enc = processor.tokenizer(ref["captions"], padding="max_length", truncation=True, return_tensors="pt")
with torch.no_grad():
    image = torch.nn.functional.normalize(model.get_image_features(pixel_values=ref["images"]), dim=-1)
    text = torch.nn.functional.normalize(model.get_text_features(**enc), dim=-1)
    logits = model(pixel_values=ref["images"], **enc).logits_per_image
print(json.dumps({"image": (image - ref["image"]).abs().max().item(), "text": (text - ref["text"]).abs().max().item(),
                  "logits": (logits - ref["logits"]).abs().max().item(), "class": type(model).__name__}))
'''


def card_snippet(out: Path) -> str:
    """The first Python block of the export's model card, as a user would paste it."""
    card = (out / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0]


# CLIP_benchmark's own model loader and zero-shot evaluation. Not its CLI: clip-benchmark 1.6.2's CLI module imports
# `requests` without declaring it (this environment lacks it), and its top-k accuracy fails on numpy >= 2.4, patched
# here with the same computation.
CLIP_BENCHMARK = '''
import json, sys
import torch
from torchvision.datasets import ImageFolder
out, root, task = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
sys.path.insert(0, out)
import contrastive_towers  # noqa: F401
from clip_benchmark.metrics import zeroshot_classification
from clip_benchmark.models import load_clip


def accuracy(output, target, topk=(1,)):
    """clip-benchmark 1.6.2's, but for .item(): its float() of a 1-element array is an error from numpy 2.4 on."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


zeroshot_classification.accuracy = accuracy
model, transform, tokenizer = load_clip(model_type="open_clip", model_name=f"local-dir:{out}", pretrained=None,
                                        cache_dir=None, device="cpu")
model.eval()
loader = torch.utils.data.DataLoader(ImageFolder(root, transform=transform), batch_size=32)
metrics = zeroshot_classification.evaluate(model, loader, tokenizer, task["classes"], task["templates"], "cpu",
                                           amp=False)
print(json.dumps(metrics))
'''

OURS = ("contrastive", "eval", "data_prep")


def run_plain(tmp: Path, script: str, *args, hide: tuple[str, ...]) -> str:
    """stdout of `script` in a fresh interpreter outside the repository with `hide` uninstallable."""
    (tmp / "runner.py").write_text(RUNNER)
    (tmp / "script.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "runner.py", ",".join(hide), "script.py", *map(str, args)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory, synthetic_data):
    """The demo's architecture (demo-convnet: convnet_xs_s2 + a small text transformer), exported both ways,
    and our model's embeddings of fixed inputs."""
    root = tmp_path_factory.mktemp("anywhere")
    run, bundle = make_run(root, synthetic_data, name="demo", overrides=["model.name=demo-convnet"])
    exports = {fmt: Path(export(run, fmt, root / fmt)["out"]) for fmt in ("open_clip", "hf")}
    torch.manual_seed(0)
    images = torch.randn(4, 3, 48, 48)
    tokens = bundle.tokenizer(CAPTIONS)
    with torch.no_grad():
        image = bundle.model.encode_image(images, normalize=True)
        text = bundle.model.encode_text(tokens, normalize=True)
    ref = {"images": images, "captions": CAPTIONS, "tokens": tokens, "image": image, "text": text,
           "logits": bundle.model.logit_scale.exp() * image @ text.t()}
    torch.save(ref, root / "reference.pt")
    return {"root": root, "reference": root / "reference.pt", **exports}


def test_open_clip_export_loads_with_open_clip_alone_as_its_card_says(demo, tmp_path):
    assert (demo["open_clip"] / "contrastive_towers.py").is_file()
    script = SNIPPET_INPUTS + card_snippet(demo["open_clip"]) + OPEN_CLIP_CHECK
    got = last_json(run_plain(tmp_path, script, demo["reference"],
                              hide=OURS + ("transformers",)))
    assert got["tokens"] and got["image"] < 1e-5 and got["text"] < 1e-5, got


def test_hf_export_loads_with_transformers_alone_as_its_card_says(demo, tmp_path):
    script = SNIPPET_INPUTS + card_snippet(demo["hf"]) + HF_CHECK
    got = last_json(run_plain(tmp_path, script, demo["reference"],
                              hide=OURS + ("timm", "open_clip")))
    assert got["class"] == "ContrastiveCLIPModel"
    assert got["image"] < 1e-5 and got["text"] < 1e-5 and got["logits"] < 1e-3, got


def test_clip_benchmark_classifies_a_folder_with_the_open_clip_export(tmp_path, synthetic_data):
    """The CIFAR recipe's architecture (cifar-convnet-xs), its export evaluated by CLIP_benchmark on an image
    folder, against our own zero-shot evaluator on the same folder."""
    from contrastive.loading import load_for_inference
    from contrastive.eval.zeroshot import LabelledImages, evaluate

    run, _ = make_run(tmp_path, synthetic_data, name="cifar", overrides=["model.name=cifar-convnet-xs"])
    out = Path(export(run, "open_clip", tmp_path / "cifar-open_clip")["out"])
    shards = LabelledImages(synthetic_data["val"], label_field="color")
    for i, (image, label, _) in enumerate(shards):
        folder = tmp_path / "folder" / shards.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    folder = LabelledImages(str(tmp_path / "folder"))
    templates = ["a {c} shape", "something {c}"]
    (tmp_path / "task.json").write_text(json.dumps({"classes": folder.classes, "templates": templates}))
    theirs = last_json(run_plain(tmp_path, CLIP_BENCHMARK, out, tmp_path / "folder", tmp_path / "task.json",
                                 hide=OURS))
    bundle, _ = load_for_inference(run)
    ours = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, folder, templates, batch_size=64)["metrics"]
    assert len(folder.classes) >= 5 and theirs["acc1"] == pytest.approx(ours["acc1"], abs=1e-6)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=1e-6)
