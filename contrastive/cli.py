"""The `contrastive` command: one entry point, one subcommand per job; heavy imports happen inside handlers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contrastive.errors import UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---------------------------------------------------------------- prep

def cmd_prep_synthetic(args) -> int:
    from data_prep.synthetic import generate

    if args.num_samples <= 0:
        raise UserError("--num-samples must be > 0")
    specs = generate(args.out_dir, num_samples=args.num_samples, num_val=args.num_val, seed=args.seed,
                     image_size=args.image_size, samples_per_shard=args.samples_per_shard)
    for split, spec in specs.items():
        print(f"{split}: {spec}")
    return 0


# ---------------------------------------------------------------- train

def cmd_train(args) -> int:
    from contrastive.config import load_config
    from contrastive.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    record = train(cfg, run_dir)
    print(json.dumps(record, indent=2))
    print(f"run directory: {run_dir}")
    return 0


# ---------------------------------------------------------------- zeroshot

def cmd_zeroshot(args) -> int:
    from eval.zeroshot import run_cli

    result = run_cli(args)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
    print(f"zero-shot {result['label_field']} on {result['num_images']} images: {metrics}")
    print(f"results: {args.output}")
    return 0


# ---------------------------------------------------------------- report

def cmd_report(args) -> int:
    from contrastive.report import render_report

    result = render_report(args.run_dir, args.out)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"{len(result['plots'])} plots; report: {result['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="turn raw data into WebDataset shards", formatter_class=_Formatter)
    prep_sub = prep.add_subparsers(dest="prep_command", required=True)
    syn = prep_sub.add_parser("synthetic", help="draw the built-in synthetic shapes dataset",
                              formatter_class=_Formatter)
    syn.add_argument("out_dir", type=Path, help="output folder; gets train/ and val/ shard sets")
    syn.add_argument("--num-samples", type=int, default=20000, help="training samples")
    syn.add_argument("--num-val", type=int, default=2000, help="validation samples")
    syn.add_argument("--seed", type=int, default=0, help="the data is a pure function of the seed")
    syn.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    syn.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    syn.set_defaults(func=cmd_prep_synthetic)

    tr = sub.add_parser("train", help="train a dual encoder", formatter_class=_Formatter,
                        description="Train from a YAML config; override any key as dotted.key=value.")
    tr.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    tr.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    tr.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 data.train=...")
    tr.set_defaults(func=cmd_train)

    zs = sub.add_parser("zeroshot", help="zero-shot classification of a labelled image set",
                        formatter_class=_Formatter)
    zs.add_argument("--model", required=True, help="run directory, checkpoint directory or exported model")
    zs.add_argument("--data", required=True, help="ImageFolder directory or WebDataset shard spec")
    zs.add_argument("--output", required=True, help="JSON results file (CLIP_benchmark's shape)")
    group = zs.add_mutually_exclusive_group()
    group.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    group.add_argument("--classnames", default=None, help="file with one class name per line, in label order")
    zs.add_argument("--templates", default=None,
                    help="prompt templates: a file with one template per line containing {c}, or a built-in "
                         "set (cifar, imagenet); default: a few generic photo prompts")
    zs.add_argument("--label-field", default="", help="JSON field holding the label (default: the .cls file)")
    zs.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    zs.add_argument("--max-samples", type=int, default=0, help="evaluate at most this many images (0: all)")
    zs.set_defaults(func=cmd_zeroshot)

    rep = sub.add_parser("report", help="plots and a one-page HTML summary of a training run",
                         formatter_class=_Formatter,
                         description="Read RUN_DIR/metrics.jsonl, config.yaml and eval JSON files; write PNG plots "
                                     "(loss, lr, logit scale, eval metrics, samples/s against steps and wall-clock) "
                                     "and report.html linking them.")
    rep.add_argument("run_dir", type=Path, help="run directory written by `contrastive train`")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"contrastive {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"contrastive {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
