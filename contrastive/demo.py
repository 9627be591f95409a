"""`make demo`: synthetic shards -> train configs/demo.yaml -> zero-shot colour and shape -> a short summary."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from contrastive.errors import UserError

REPO = Path(__file__).resolve().parent.parent
# Zero-shot tasks on the validation split: (label field, prompt templates).
TASKS = {
    "color": ["a {c} shape", "something {c}", "a {c} object"],
    "shape": ["a {c}", "a drawing of a {c}", "a picture of a {c}"],
}


def run(out: Path, *, config: Path, num_samples: int, num_val: int, image_size: int, overrides: list[str]) -> dict:
    from contrastive.config import load_config
    from contrastive.train import train
    from contrastive.data_prep.synthetic import generate
    from contrastive.eval.zeroshot import LabelledImages, benchmark_json, evaluate
    from contrastive.loading import load_for_inference

    start = time.time()
    print(f"[1/3] drawing {num_samples} + {num_val} synthetic image-text pairs into {out / 'data'}", flush=True)
    specs = generate(out / "data", num_samples=num_samples, num_val=num_val, seed=0, image_size=image_size)
    print(f"[2/3] training {config} into {out / 'run'}", flush=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo always trains afresh; the data is kept
    cfg = load_config(config, [f"data.train={specs['train']}", f"data.val={specs['val']}", "eval.evaluators=[]",
                               *overrides])
    train(cfg, out / "run")
    print("[3/3] zero-shot classification on the validation split", flush=True)
    bundle, info = load_for_inference(out / "run")
    results = {}
    for field, templates in TASKS.items():
        images = LabelledImages(specs["val"], label_field=field)
        res = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, images, templates, batch_size=500)
        path = out / f"zeroshot_{field}.json"
        path.write_text(json.dumps(benchmark_json(dataset=specs["val"], model=str(out / "run"), metrics=res["metrics"],
                                                  label_field=field, classes=images.classes,
                                                  num_images=res["num_images"], templates=templates), indent=2))
        results[field] = (res["metrics"], len(images.classes), path)
    elapsed = time.time() - start
    print(f"\n=== demo finished in {elapsed / 60:.1f} min: model {cfg.model.name}, {cfg.train.steps} steps of "
          f"{cfg.train.batch_size} ===")
    for field, (metrics, num_classes, path) in results.items():
        print(f"zero-shot {field:<6} top-1 {metrics['acc1']:.3f}  (chance {1 / num_classes:.3f}, "
              f"{num_classes} classes)  -> {path}")
    print(f"run directory: {out / 'run'} (metrics.jsonl, checkpoints/, tensorboard/)")
    return {field: metrics for field, (metrics, _, _) in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo output folder")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        run(args.out, config=args.config, num_samples=args.num_samples, num_val=args.num_val,
            image_size=args.image_size, overrides=args.overrides)
    except UserError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
