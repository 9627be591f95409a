"""The `contrastive` command: one entry point, one subcommand per job; heavy imports happen inside handlers."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from contrastive.errors import UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" only where it tells something: not for None, False, empty values, or a help
    text that already says what the default is."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if default is None or default is False or default in ("", []) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _IntermixedParser(argparse.ArgumentParser):
    """Lets positionals (key=value overrides) come before, between and after options."""

    def parse_known_args(self, args=None, namespace=None):
        # parse_known_intermixed_args calls back into us; argparse cannot intermix a parser with subcommands
        if getattr(self, "_intermixing", False) or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


# ---------------------------------------------------------------- prep

def cmd_prep_synthetic(args) -> int:
    from contrastive.data_prep.synthetic import generate

    if args.num_samples <= 0:
        raise UserError("--num-samples must be > 0")
    specs = generate(args.out_dir, num_samples=args.num_samples, num_val=args.num_val, seed=args.seed,
                     image_size=args.image_size, samples_per_shard=args.samples_per_shard)
    for split, spec in specs.items():
        print(f"{split}: {spec}")
    return 0


# ---------------------------------------------------------------- train

def _build_options(args):
    import math

    from contrastive.data_prep.build import BuildOptions
    from contrastive.data_prep.images import ImageOptions

    try:
        image = ImageOptions(image_size=args.image_size, resize_mode=args.resize_mode, jpeg_quality=args.jpeg_quality,
                             min_image_size=args.min_image_size,
                             max_aspect_ratio=args.max_aspect_ratio if args.max_aspect_ratio > 0 else math.inf,
                             max_pixels=args.max_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None
    return BuildOptions(image=image, samples_per_shard=args.samples_per_shard, dedup=args.dedup)


def _print_prep_summary(summary: dict, out_dir: Path) -> None:
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    converted = ", ".join(f"{k}={v}" for k, v in summary["converted"].items()) or "none"
    print(f"{summary['num_samples']} samples from {summary['num_inputs']} inputs in {summary['num_shards']} shards "
          f"({summary['shards_written']} written, {summary['shards_kept']} kept from an earlier run)")
    print(f"skipped: {skipped}")
    print(f"converted: {converted}")
    print(f"summary: {out_dir / 'prep.json'}")


def cmd_prep_pairs(args) -> int:
    from contrastive.data_prep.pairs import prep_pairs

    summary = prep_pairs(args.input, args.out_dir, opts=_build_options(args), image_column=args.image_column,
                         caption_column=args.caption_column, image_root=args.image_root,
                         images_list=args.images_list, one_row_per_caption=args.one_row_per_caption,
                         num_procs=args.num_procs)
    _print_prep_summary(summary, args.out_dir)
    if "images_list" in summary:
        listed = summary["images_list"]
        print(f"images list: {listed['found']} of {listed['listed']} listed images found, "
              f"{listed['not_found']} not found ({listed['file']})")
    print(f"shards: {args.out_dir}/{{00000..{summary['num_shards'] - 1:05d}}}.tar")
    return 0


def cmd_prep_imagefolder(args) -> int:
    from contrastive.data_prep.imagefolder import prep_imagefolder

    summary = prep_imagefolder(args.root, args.out_dir, opts=_build_options(args), split=args.split,
                               templates_file=args.templates, classnames_file=args.classnames,
                               shuffle_seed=args.shuffle_seed, num_procs=args.num_procs)
    _print_prep_summary(summary, args.out_dir / args.split)
    print(f"shards: {args.out_dir / args.split}/{{00000..{summary['num_shards'] - 1:05d}}}.tar "
          f"({summary['classes']} classes in {args.out_dir / 'classnames.txt'})")
    return 0


def _add_image_options(parser) -> None:
    """Options shared by `prep pairs` and `prep imagefolder` (img2dataset's names and defaults)."""
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels after resizing")
    parser.add_argument("--resize-mode", default="border", choices=("no", "border", "keep_ratio", "center_crop"),
                        help="no: keep the size; border: fit the longer side and pad to a square; keep_ratio: "
                             "fit the shorter side; center_crop: fit the shorter side and crop a square")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="inputs per shard (at most 10000)")
    parser.add_argument("--min-image-size", type=int, default=0, help="skip images whose shorter side is smaller")
    parser.add_argument("--max-aspect-ratio", type=float, default=0,
                        help="skip images with long side / short side above this (0: no limit)")
    parser.add_argument("--max-pixels", type=int, default=100_000_000,
                        help="skip images with more pixels than this (after reduced-size JPEG decoding)")
    parser.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                        help="skip inputs whose image bytes equal an earlier input's from another file")
    parser.add_argument("--num-procs", type=int, default=None, help="worker processes (default: all cores)")


def cmd_train(args) -> int:
    from contrastive.preemption import EXIT_PREEMPTED, StopRequest

    stop = StopRequest()  # before the heavy imports: a scheduler's early USR1/TERM must not kill start-up
    from contrastive.config import load_config
    from contrastive.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(cfg, run_dir, stop=stop)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.record, indent=2))
        status = "stopped early on request (resume with train.resume=latest)" if result.preempted else "finished"
        print(f"{status} at step {result.step}; run directory: {run_dir}")
    return EXIT_PREEMPTED if result.preempted else 0


# ---------------------------------------------------------------- config

def cmd_config_show(args) -> int:
    import yaml

    from contrastive.config import load_config, to_dict

    # CONFIG is the one positional that is not a key=value override, wherever it stands.
    files = [item for item in [str(args.config), *args.overrides] if "=" not in item]
    if len(files) != 1:
        raise UserError(f"give one config file and key=value overrides; got {len(files)} files: {' '.join(files)}")
    overrides = [item for item in [str(args.config), *args.overrides] if "=" in item]
    cfg = load_config(files[0], overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


# ---------------------------------------------------------------- zeroshot

def cmd_zeroshot(args) -> int:
    from contrastive.eval.zeroshot import run_cli

    result = run_cli(args)
    if args.predict:
        for item in result["predictions"]:
            labels = ", ".join(f"{p['label']} {p['prob']:.3f}" for p in item["predictions"])
            print(f"{item['image']}: {labels}")
    else:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
        print(f"zero-shot {result['label_field']} on {result['num_images']} images: {metrics}")
        if args.confusion_matrix:
            print(f"confusion matrix: {args.confusion_matrix}")
    if args.output:
        print(f"results: {args.output}")
    return 0


# ---------------------------------------------------------------- retrieval

def cmd_retrieval(args) -> int:
    from contrastive.eval.retrieval import run_cli

    result = run_cli(args)
    m = result["metrics"]
    print(f"retrieval on {result['num_images']} images, {result['num_texts']} captions: mean recall "
          f"{m['mean_recall']:.4f}; text->image " + " ".join(f"R@{k} {m[f'image_retrieval_recall@{k}']:.4f}"
                                                            for k in (1, 5, 10))
          + "; image->text " + " ".join(f"R@{k} {m[f'text_retrieval_recall@{k}']:.4f}" for k in (1, 5, 10))
          + f"; results: {args.output}")
    return 0


# ---------------------------------------------------------------- index, search, arith-eval

def cmd_index(args) -> int:
    from contrastive.eval.index import build_index_dir

    params = build_index_dir(model=args.model, data=args.data, out=args.out, batch_size=args.batch_size,
                             kind=args.index_type, target_recall=args.target_recall, nlist=args.nlist,
                             max_flat_gb=args.max_flat_gb, exact_max=args.exact_max, overwrite=args.overwrite,
                             seed=args.seed, retrieval_metrics=args.retrieval_metrics, text_index=args.text)
    emb = params.extra["embeddings"]
    probe = f", nprobe {params.nprobe}" if params.nprobe else ""
    print(f"indexed {params.count} images ({emb['num_skipped']} skipped) as {params.factory}{probe}: "
          f"recall@{params.recall_k} {params.measured_recall:.3f} against exact search")
    if params.measured_recall < params.target_recall:
        print(f"warning: the index reaches recall@{params.recall_k} {params.measured_recall:.3f}, below the target "
              f"{params.target_recall}; use --index-type ivf_flat or a larger --max-flat-gb")
    if "retrieval" in params.extra:
        r = params.extra["retrieval"]
        for side, name in (("text", "image->text"), ("image", "text->image")):
            print(f"{name} " + "  ".join(f"R@{k} {r[f'{side}_retrieval_recall@{k}']:.3f}" for k in (1, 5, 10)))
    print(f"index directory: {args.out}")
    return 0


def cmd_search(args) -> int:
    from contrastive.eval.search import run_cli

    out = run_cli(args)
    if out["query"]["excluded_as_query_image"]:
        print(f"(left out the query image: {', '.join(out['query']['excluded_as_query_image'])})")
    for r in out["results"]:
        print(f"{r['rank']:>3}  {r['score']:.4f}  {r['image_path']}  {r.get('caption', '')}")
    for flag, label in ((args.json, "results"), (args.grid, "grid")):
        if flag:
            print(f"{label}: {flag}")
    return 0


def cmd_serve(args) -> int:
    from contrastive.eval.serve import run_cli

    run_cli(args)
    return 0


def cmd_arith_eval(args) -> int:
    from contrastive.eval.arith import run_cli

    result = run_cli(args)
    print(f"'{result['attribute']}' arithmetic on {result['num_queries']} queries from "
          f"{result['num_labelled_images']} labelled images ({result['num_skipped_no_target']} left out: no "
          f"target image), keeping {result['keep']}; images per value: "
          + ", ".join(f"{v} {n}" for v, n in result["images_per_value"].items()))
    for method, recall in result["recall"].items():
        print(f"  {method:<16} " + "  ".join(f"R@{k} {v:.3f}" for k, v in recall.items()))
    best = max(result["weight_sweep"], key=lambda w: result["weight_sweep"][w]["10"])
    print(f"  best W in the sweep for R@10: {best} ({result['weight_sweep'][best]['10']:.3f})")
    print(f"results: {args.output}\nchart: {result['plot']}")
    return 0


# ---------------------------------------------------------------- report

def cmd_report(args) -> int:
    from contrastive.report import render_report

    result = render_report(args.run_dir, args.out)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"{len(result['plots'])} plots; report: {result['html']}")
    return 0


# ---------------------------------------------------------------- slurm

def cmd_slurm_submit(args) -> int:
    from contrastive.slurm import JobRequest, submit

    req = JobRequest(config=args.config, overrides=args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, launcher=args.launcher,
                     partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                     job_name=args.job_name, run_dir=args.out, signal_s=args.signal_seconds,
                     max_restarts=args.max_restarts, sbatch_args=args.sbatch_arg, env=args.env)
    sub = submit(req, dry_run=args.dry_run)
    notes = sub.plan.notes + ([] if sub.cluster_checked else ["no Slurm commands here: checked the config only"])
    if args.dry_run:
        print(sub.script, end="")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print("dry run: nothing written, nothing submitted", file=sys.stderr)
        return 0
    for note in notes:
        print(f"note: {note}")
    run = sub.plan.run_dir
    print(f"submitted job {sub.job_id}; run directory: {run}")
    print(f"job log: {run}/logs/slurm-{sub.job_id}.out; per-rank logs: {run}/logs/job-{sub.job_id}-run*/")
    return 0


# ---------------------------------------------------------------- export

def cmd_export(args) -> int:
    from contrastive.export import export

    summary = export(args.model, args.format, args.out, dtype=args.dtype, overwrite=args.overwrite, data=args.data,
                     batch_size=args.batch_size, rows_per_file=args.rows_per_file, check=not args.no_check)
    if summary.get("check_max_abs_diff") is not None:
        print(f"checked: max abs difference of normalised embeddings vs the model {summary['check_max_abs_diff']:.2e}")
    if args.format == "embeddings":
        print(f"{summary['num_samples']} samples embedded ({summary['num_skipped']} skipped), "
              f"dim {summary['dim']}, {len(summary['parts'])} part(s)")
    print(f"{args.format} export: {summary['out']} (model card: {summary['out']}/README.md, "
          f"summary: {summary['out']}/export.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from contrastive import __version__

    parser = argparse.ArgumentParser(prog="contrastive", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Every command takes its positionals (key=value overrides, paths) before, between and after its options.
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)

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

    pairs = prep_sub.add_parser(
        "pairs", help="image-caption pairs from a folder, a table or a tar", formatter_class=_Formatter,
        description="INPUT is a folder of images with a sidecar caption each (a.jpg + a.txt [+ a.json]), a "
                    "CSV/TSV/JSONL/Parquet table with an image-path and a caption column (other columns go into "
                    "each sample's JSON; a .txt table is read as CSV, e.g. Kaggle's Flickr captions.txt), a folder "
                    "in Kaggle's Flickr layout (captions.txt + Images/), or a tar of such pairs. Table rows naming "
                    "the same image make one sample: .txt holds the first caption, the JSON's \"captions\" all of "
                    "them in row order. Writes img2dataset-style shards into OUT_DIR; re-running the same command "
                    "keeps finished shards.")
    pairs.add_argument("input", type=Path,
                       help="folder, Kaggle Flickr folder, table (.csv .tsv .jsonl .parquet .txt) or tar")
    pairs.add_argument("out_dir", type=Path, help="output folder for the shards")
    pairs.add_argument("--image-column", default=None,
                       help="table column with image paths (default: the first of filepath, image_path, image, "
                            "path, file, filename, url)")
    pairs.add_argument("--caption-column", default=None,
                       help="table column with captions (default: the first of caption, title, text, txt, alt)")
    pairs.add_argument("--image-root", type=Path, default=None,
                       help="folder that relative image paths of a table start from (default: the table's folder; "
                            "Images/ in Kaggle's Flickr layout)")
    pairs.add_argument("--images-list", type=Path, default=None,
                       help="split file, one image file name per line (e.g. Flickr_8k.trainImages.txt): keep only "
                            "inputs whose image file name is listed (default: all)")
    pairs.add_argument("--one-row-per-caption", action="store_true",
                       help="a table's rows stay one sample each, also when several name the same image "
                            "(open_clip's CSV layout); default: one sample per image with all its captions")
    _add_image_options(pairs)
    pairs.set_defaults(func=cmd_prep_pairs)

    folder = prep_sub.add_parser(
        "imagefolder", help="a classification set (one folder per class) as captioned, labelled shards",
        formatter_class=_Formatter,
        description="ROOT holds one folder per class (or is a tar of such a folder). Each image gets a caption "
                    "from a template with its class name, and a .cls label; OUT_DIR gets classnames.txt and "
                    "zeroshot_classification_templates.txt (CLIP_benchmark's WebDataset layout), and the shards "
                    "go into OUT_DIR/SPLIT. Training and `contrastive zeroshot` read the result.")
    folder.add_argument("root", type=Path, help="folder of class folders, or a tar of one")
    folder.add_argument("out_dir", type=Path, help="output folder of the set")
    folder.add_argument("--templates", type=Path, default=None,
                        help="file with one caption template per line containing {c} (default: 14 built-in "
                             "photo templates)")
    folder.add_argument("--classnames", type=Path, default=None,
                        help="file with one class name per line, in the sorted order of the class folders "
                             "(default: folder names with _ as spaces)")
    folder.add_argument("--split", default="train", help="sub-folder of OUT_DIR for the shards (train, test, ...)")
    folder.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the order images are written in, so that each shard holds every class "
                             "(a folder input; a tar is written in its own order)")
    folder.add_argument("--no-shuffle", dest="shuffle_seed", action="store_const", const=None,
                        help="write a folder's images in folder order (one class after another)")
    _add_image_options(folder)
    folder.set_defaults(func=cmd_prep_imagefolder)

    tr = sub.add_parser("train", help="train a dual encoder", formatter_class=_Formatter,
                        description="Train from a YAML config; override any key as dotted.key=value.")
    tr.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    tr.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    tr.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 data.train=...")
    tr.set_defaults(func=cmd_train)

    cf = sub.add_parser("config", help="inspect run configs", formatter_class=_Formatter)
    cf_sub = cf.add_subparsers(dest="config_command", required=True)
    show = cf_sub.add_parser("show", help="print the resolved config (YAML)", formatter_class=_Formatter,
                             description="Print CONFIG with the overrides applied over the defaults, every key, as "
                                         "the run directory's config.yaml records it (values `auto` stay auto: the "
                                         "run chooses them for its device).")
    show.add_argument("config", type=Path, help="YAML run config, e.g. configs/demo.yaml")
    show.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 data.train=...")
    show.set_defaults(func=cmd_config_show)

    zs = sub.add_parser("zeroshot", help="zero-shot classification of a labelled image set, or of single images",
                        formatter_class=_Formatter,
                        description="Evaluate on a labelled set (--data, --output) or print the top labels of "
                                    "single images (--predict IMAGE...).")
    zs.add_argument("--model", required=True, help="run directory, checkpoint directory or exported model")
    zs.add_argument("--data", default=None,
                    help="ImageFolder directory, WebDataset shard spec, folder of .tar shards, or CLIP_benchmark "
                         "WebDataset folder (SPLIT/nshards.txt, classnames.txt, zeroshot_classification_templates.txt)")
    zs.add_argument("--output", default=None, help="JSON results file (CLIP_benchmark's shape); needed with --data")
    zs.add_argument("--predict", nargs="+", default=None, metavar="IMAGE",
                    help="image files to label; prints the top-k labels with probabilities")
    zs.add_argument("--top-k", type=int, default=5, help="labels printed per image with --predict")
    group = zs.add_mutually_exclusive_group()
    group.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    group.add_argument("--classnames", default=None,
                       help="class names in label order: one per line, or CLIP_benchmark's JSON {dataset: [names]}")
    zs.add_argument("--templates", default=None,
                    help="prompt templates containing {c}: a built-in set (cifar: CLIP's 18, imagenet: CLIP's 80), "
                         "a file with one per line, CLIP_benchmark's JSON {dataset: [templates]}, or per-class "
                         "prompt lists as JSON {class: [prompts]}; default: the CLIP_benchmark folder's own "
                         "templates, else a few generic photo prompts")
    zs.add_argument("--dataset-name", default=None,
                    help="which entry of a CLIP_benchmark JSON classnames/templates file to use (e.g. cifar10)")
    zs.add_argument("--split", default="test", help="split of a CLIP_benchmark WebDataset folder")
    zs.add_argument("--label-field", default="", help="JSON field holding the label (default: the .cls file)")
    zs.add_argument("--confusion-matrix", default=None, metavar="PNG", help="also draw the confusion matrix here")
    zs.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    zs.add_argument("--max-samples", type=int, default=0, help="evaluate at most this many images (0: all)")
    zs.set_defaults(func=cmd_zeroshot)

    rt = sub.add_parser("retrieval", help="image<->text retrieval Recall@1/5/10 with every caption of each image",
                        formatter_class=_Formatter,
                        description="The standard protocol: text->image Recall@K over every caption "
                                    "(image_retrieval_recall@K) and image->text Recall@K where a hit is any of the "
                                    "image's captions in the top K (text_retrieval_recall@K), K = 1, 5, 10, and "
                                    "mean_recall (their mean), in CLIP_benchmark's names and result shape. Ties go "
                                    "to the true match.")
    rt.add_argument("--model", required=True, help="run directory, checkpoint directory or exported model")
    rt.add_argument("--data", required=True,
                    help="WebDataset shard spec or folder of .tar shards (captions: the .json's 'captions' list, "
                         "else the .txt's lines); a Kaggle Flickr folder (captions.txt CSV 'image,caption' and "
                         "Images/); or CLIP_benchmark's flickr root (flickr8k_test_karpathy.txt or "
                         "flickr30k_test_karpathy.txt beside the images) or such an annotation file itself")
    rt.add_argument("--output", required=True, help="JSON results file")
    rt.add_argument("--images-list", default=None, metavar="FILE",
                    help="folder layouts: keep only the images named in FILE (one a line), e.g. "
                         "Flickr_8k.devImages.txt")
    rt.add_argument("--batch-size", type=int, default=256, help="images or captions per forward pass")
    rt.add_argument("--max-samples", type=int, default=0, help="score the first this many images only (0: all)")
    rt.set_defaults(func=cmd_retrieval)

    ix = sub.add_parser("index", help="embed a shard set and build a FAISS index for search",
                        formatter_class=_Formatter,
                        description="Writes OUT: img_emb/, text_emb/ (float16 .npy parts), metadata/ (Parquet) in "
                                    "clip-retrieval's layout, then image.index (FAISS) and index.json (its "
                                    "parameters). Exact search under --exact-max vectors, IVF-Flat above, IVF-PQ "
                                    "past --max-flat-gb; nprobe is tuned to --target-recall; the GPU is used when "
                                    "faiss sees one.")
    ix.add_argument("--model", required=True, help="run directory, checkpoint directory or exported model")
    ix.add_argument("--data", required=True,
                    help="image-caption pairs: a WebDataset shard spec, or a folder of .tar shards such as "
                         "img2dataset's output folder")
    ix.add_argument("--out", required=True, help="index directory to write")
    ix.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    ix.add_argument("--index-type", default="auto", choices=["auto", "flat", "ivf_flat", "ivf_pq"],
                    help="FAISS index; auto: exact up to --exact-max, else IVF when held-out vectors show it meets "
                         "--target-recall at >= 2x exact search's speed")
    ix.add_argument("--exact-max", type=int, default=20_000, help="auto: exact search up to this many vectors")
    ix.add_argument("--max-flat-gb", type=float, default=16.0,
                    help="auto: IVF-PQ instead of IVF-Flat when the float32 vectors pass this size")
    ix.add_argument("--nlist", type=int, default=0, help="IVF lists (0: the power of two nearest 4*sqrt(N))")
    ix.add_argument("--target-recall", type=float, default=0.95,
                    help="IVF: smallest nprobe whose recall@10 against exact search reaches this")
    ix.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    ix.add_argument("--seed", type=int, default=0, help="seed of IVF training and tuning samples")
    ix.add_argument("--retrieval-metrics", action="store_true",
                    help="also compute image<->text Recall@1/5/10 of the indexed pairs (exact, chunked through "
                         "FAISS) into OUT/retrieval.json")
    ix.add_argument("--text", action="store_true",
                    help="also index the captions (text.index), so that `search --modality text` and the "
                         "service can answer a query with captions")
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", help="search an index by text, image, or embedding arithmetic",
                        formatter_class=_Formatter,
                        description="The query is normalise(image + W * (sum(plus) - sum(minus))) with --image, "
                                    "else the text (plus W * (plus - minus)); the query image itself is never "
                                    "returned. Example: --image red_car.jpg --minus red --plus blue.")
    se.add_argument("--index", required=True, help="index directory written by `contrastive index`")
    se.add_argument("--model", default=None, help="model for the query (default: the one named in index.json)")
    se.add_argument("--text", action="append", default=None, help="query text (repeatable)")
    se.add_argument("--image", default=None, help="query image: a file, or the key of an indexed sample")
    se.add_argument("--plus", action="append", default=None, metavar="T", help="text to add (repeatable)")
    se.add_argument("--minus", action="append", default=None, metavar="T", help="text to subtract (repeatable)")
    se.add_argument("--weight", type=float, default=1.0, help="W: weight of the texts added to an image")
    se.add_argument("-k", type=int, default=10, help="results to return")
    se.add_argument("--modality", default="image", choices=("image", "text"),
                    help="search the images, or the captions (an index built with `index --text`)")
    se.add_argument("--grid", default=None, metavar="PNG", help="contact sheet of the query and its results")
    se.add_argument("--json", default=None, metavar="FILE", help="results as JSON")
    se.set_defaults(func=cmd_search)

    sv = sub.add_parser("serve", help="serve an index: a JSON search API and a search page for the browser",
                        formatter_class=_Formatter,
                        description="Loads the index and its model once and serves POST /search (text, image, "
                                    "plus/minus texts with weights), GET /image/KEY, /health, /info and the search "
                                    "page at /. Binds loopback unless --host says otherwise.")
    sv.add_argument("--index", required=True, help="index directory written by `contrastive index`")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind; another than loopback prints a warning")
    sv.add_argument("--port", type=int, default=8000, help="port to bind")
    sv.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN'; None: $CONTRASTIVE_TOKEN if set, else no token")
    sv.add_argument("--model", default=None, help="model for the queries; None: the one named in index.json")
    sv.add_argument("--max-k", type=int, default=100, help="the most results one query may ask for")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="the largest query image accepted, in MiB")
    sv.add_argument("--concurrent-queries", type=int, default=os.cpu_count() or 1,
                    help="queries embedded and searched at once, one thread each")
    sv.set_defaults(func=cmd_serve)

    ar = sub.add_parser("arith-eval", help="Recall@k of embedding arithmetic on attribute-labelled data",
                        formatter_class=_Formatter,
                        description="For each query image and each other value of --attribute, a hit is an image "
                                    "with that value that keeps the query's --keep attributes. Compares "
                                    "image - text(value) + text(target) with image only, target text only, and "
                                    "image + target text (SIMAT / Pic2Word protocol), and sweeps W.")
    ar.add_argument("--index", required=True, help="index directory written by `contrastive index`")
    ar.add_argument("--attribute", required=True,
                    help="the attribute to change: a metadata column (color; classname for a `prep imagefolder` "
                         "set such as CIFAR-10) or one of --labels / --attributes-from-captions (animal, "
                         "clothing_color)")
    ar.add_argument("--labels", default=None, metavar="CSV",
                    help="attribute table joined to the index by image file name: an `image` column and one "
                         "column per attribute (empty: no value; such images are never queries or hits)")
    ar.add_argument("--attributes-from-captions", nargs="?", const="", default=None, metavar="CAPTIONS",
                    help="derive animal and clothing_color with eval/caption_attributes.py's rules from a "
                         "Kaggle-style image,caption CSV, or from the index's own captions when no file is given")
    ar.add_argument("--keep", default=None,
                    help="comma-separated attributes a hit must share with the query (default: the other "
                         "intrinsic ones of the synthetic set present in the metadata: shape, color, size)")
    ar.add_argument("--model", default=None, help="model for the texts (default: the one named in index.json)")
    ar.add_argument("--weight", type=float, default=1.0, help="W in image + W * (text(target) - text(value))")
    ar.add_argument("--weights", default="0.25,0.5,0.75,1,1.5,2,3,4", help="the W sweep")
    ar.add_argument("--templates", default=None,
                    help="templates for the value texts, averaged (as zeroshot --templates; default: CLIP's "
                         "CIFAR templates for classname, a caption rule's own for its attribute, else '{c}', "
                         "'a {c} object', 'a picture of something {c}')")
    ar.add_argument("--max-queries", type=int, default=2000, help="query images sampled (0: every image)")
    ar.add_argument("--seed", type=int, default=0, help="seed of the query sample")
    ar.add_argument("--output", required=True, help="JSON results file")
    ar.add_argument("--plot", default=None, help="PNG chart; None: --output with .png")
    ar.set_defaults(func=cmd_arith_eval)

    rep = sub.add_parser("report", help="plots and a one-page HTML summary of a training run",
                         formatter_class=_Formatter,
                         description="Read RUN_DIR/metrics.jsonl, config.yaml and eval JSON files; write PNG plots "
                                     "(loss, lr, logit scale, eval metrics, samples/s against steps and wall-clock) "
                                     "and report.html linking them.")
    rep.add_argument("run_dir", type=Path, help="run directory written by `contrastive train`")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")
    rep.set_defaults(func=cmd_report)

    sl = sub.add_parser("slurm", help="run training as a Slurm job (multi-node, preemptible)", formatter_class=_Formatter)
    sl_sub = sl.add_subparsers(dest="slurm_command", required=True, parser_class=_IntermixedParser)
    sb = sl_sub.add_parser(
        "submit", help="check, render and submit slurm/train.sbatch", formatter_class=_Formatter,
        description="Resolve CONFIG with the overrides, check the request against the config and the cluster "
                    "and what the run will read (model name, shards, evaluator data), write the resolved config "
                    "into RUN_DIR/slurm/ and a copy of the code (with its git commit) into RUN_DIR/code/, which "
                    "every start of the job runs, render slurm/train.sbatch and sbatch it. The job checkpoints "
                    "and requeues itself on USR1 (sent --signal-seconds before the time limit) and continues "
                    "with train.resume=latest.")
    sb.add_argument("config", type=Path, help="YAML run config, e.g. configs/demo.yaml")
    sb.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 deepspeed.zero_stage=2")
    sb.add_argument("--nodes", type=int, default=1, help="nodes")
    sb.add_argument("--gpus-per-node", type=int, required=True,
                    help="GPUs per node, one training process each; 0 for a CPU job (see --tasks-per-node)")
    sb.add_argument("--tasks-per-node", type=int, default=0,
                    help="training processes per node in a CPU job (0: 1); with GPUs it is --gpus-per-node")
    sb.add_argument("--cpus-per-task", type=int, default=0,
                    help="CPUs per training process (0: data.num_workers + 1)")
    sb.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                    help="srun: one Slurm task per process; torchrun: one torchrun per node spawning them")
    sb.add_argument("--partition", default="", help="partition (default: the cluster's default partition)")
    sb.add_argument("--time", default="", help="time limit, e.g. 2-00:00:00 (default: the partition's)")
    sb.add_argument("--account", default="", help="account to charge")
    sb.add_argument("--qos", default="", help="quality of service")
    sb.add_argument("--job-name", default="", help="job name (default: contrastive-<run directory name>)")
    sb.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>)")
    sb.add_argument("--signal-seconds", type=int, default=300,
                    help="Slurm sends USR1 this long before the time limit: time to finish a step and checkpoint")
    sb.add_argument("--max-restarts", type=int, default=20, help="requeue at most this many times")
    sb.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                    help="extra sbatch option, repeatable, e.g. --sbatch-arg=--exclusive")
    sb.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the job, repeatable, e.g. --env NCCL_DEBUG=WARN")
    sb.add_argument("--dry-run", action="store_true", help="print the job script and check it; submit nothing")
    sb.set_defaults(func=cmd_slurm_submit)

    ex = sub.add_parser(
        "export", help="export a trained model: open_clip, transformers CLIPModel, ONNX or embeddings",
        formatter_class=_Formatter,
        description="Write a trained model where other tools load it unchanged, with a README.md model card.\n"
                    "  open_clip:  open_clip.create_model_and_transforms('local-dir:OUT'), get_tokenizer('local-dir:OUT')\n"
                    "  hf:         transformers CLIPModel / CLIPProcessor .from_pretrained(OUT) (ViT + text transformer)\n"
                    "  onnx:       image_encoder.onnx and text_encoder.onnx, dynamic batch, checked with onnxruntime\n"
                    "  embeddings: image and caption embeddings of --data in clip-retrieval's layout (float16)")
    ex.add_argument("--model", required=True,
                    help="run directory (its latest checkpoint), checkpoint directory (ZeRO-sharded or not) "
                         "or an open_clip export")
    ex.add_argument("--format", required=True, choices=("open_clip", "hf", "embeddings", "onnx"), help="what to write")
    ex.add_argument("--out", required=True, help="output directory; must be new or empty unless --overwrite")
    ex.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                    help="weights dtype (open_clip, hf, onnx); embeddings are always float16")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out (only once the new export is complete)")
    ex.add_argument("--data", default=None,
                    help="--format embeddings: WebDataset shards, e.g. data/{00000..00009}.tar or the folder data/")
    ex.add_argument("--batch-size", type=int, default=256, help="--format embeddings: samples per forward pass")
    ex.add_argument("--rows-per-file", type=int, default=1_000_000,
                    help="--format embeddings: rows per img_emb_N/text_emb_N/metadata_N part")
    ex.add_argument("--no-check", action="store_true",
                    help="skip loading the export back and comparing its embeddings with the model")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"contrastive {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name != "faiss":
            raise
        # faiss comes from one of two extras, as its CPU and GPU wheels both install the module `faiss`.
        print(f"contrastive {args.command}: error: FAISS is not installed: pip install 'contrastive[cpu]' (faiss-cpu) "
              f"or 'contrastive[gpu]' (faiss-gpu-cu12, which then replaces it)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"contrastive {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
