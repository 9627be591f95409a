"""The GPU check of issue 17: the training path users run, checked on one GPU in one command and one table.

On the device machine (one H100/H200; the wheels bench/gpu_wheels.sh puts in .whl/, carried), the exact call:

    run(carry=[".whl"], timeout_s=600, command="python3 -m pip install -q --no-index --no-deps --no-compile
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
        PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log")

(one line; the script stops itself at --budget-s, 450 s by default, so the 600 s leave room for a rerun's worth
of nothing but the install). Elsewhere with a GPU: `bash bench/gpu_wheels.sh` is not needed when the packages
of pyproject.toml are installed; run `python bench/gpu_check.py`.

Sections, most important first. Each is guarded: an error fills its row with the error and the next section
runs; a section that the remaining time cannot hold is skipped with that reason.

  card            the card's spec dense bf16 peak (looked up by name) and its measured bf16 matmul rate
  process group   the default group contrastive.engine.init_distributed starts (the one `contrastive train`
                  uses): expected cpu:gloo,cuda:nccl (contrastive.distributed.process_group_backend), each
                  backend used once (a host-tensor all_gather, a device-tensor all_reduce)
  defaults        4 steps of tiny-vit-32 with model.patch_dropout=0.5 and nothing else set: the precision the
                  forward ran in (bf16 autocast or bf16 weights expected on CUDA), TF32, pinned batches; and
                  the host syncs of each step, with their sites (open_clip's patch dropout indexes the
                  device tensor with CPU indices)
  train           --train-steps (300) steps at amp_bf16 from synthetic 224 px shards, a zero-shot evaluator
                  and a checkpoint at the middle step and the last. The model is ViT-B/16 with its image tower
                  from timm with stochastic depth (drop path 0.1), which draws on the CUDA RNG (open_clip's own
                  ViT draws nothing there: its patch dropout draws on the CPU). Host syncs are counted by step
                  with torch.cuda.set_sync_debug_mode; between the steps where the loop reads the device on
                  purpose (train.sync_every, log, checkpoint, evaluation) 0 are expected
  resume          the same run resumed from its middle checkpoint: its logged losses and its final evaluation
                  equal the uninterrupted run's, bit for bit (both runs use torch's deterministic algorithms)
  export          `contrastive export --format open_clip` of the trained model, reloaded with
                  load_for_inference: the same embeddings on the device as the trained model and its checkpoint
  search          exact top-10 on the device through torch (one matmul + topk) against faiss-cpu's
                  IndexFlatIP top-10 on the same vectors (a float64 reference instead if faiss is missing)
  decode          data.decode_on_device: the loader's JPEG batches decoded, cropped and resampled on the device
                  (nvJPEG) against the same batches on the CPU, in grey levels (mean <= 1 expected)
  MODEL step      for each of --models: bench/gpu_throughput.py's step rows, open_clip's step against ours
                  `fast` (amp_bf16, train.sync_every, compiled towers, train.dedupe_captions off), MFU against
                  the spec peak and against the measured matmul rate. Goals: >= 1.3x open_clip, and for
                  ViT-B-16 >= 35% of the spec peak
  MODEL e2e       end to end from the synthetic shards, open_clip's trainer and loader against ours, with
                  JPEG decoding on the device off and on (data.decode_on_device, when the config has it).
                  Goal: ours' ratio end to end at least its ratio on the step alone

Every figure goes to the JSON file (--out); the table ends with its path. Exit status 1 if any row FAILs or
ERRORs. `--tiny` runs the same code on a CPU (tiny-vit-32 at 32 px, 12 training steps, its patch dropout
drawing on the CPU RNG) in about a minute; tests/test_gpu_bench.py runs it, and speed goals are not judged.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]
if __name__ == "__main__" and "--tiny" in sys.argv[1:]:  # the CPU run: hide GPUs before torch/DeepSpeed look
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# cuBLAS repeats its results run after run only with a fixed workspace (the resume check compares bits); read
# when CUDA starts, so set before anything touches it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import gpu_throughput as gt  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets, matched against torch.cuda.get_device_name
# (first match wins: "NVIDIA H100 PCIe" must not read as the SXM part, "NVIDIA H100 80GB HBM3").
SPEC_BF16_DENSE = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("A100", 312e12))
TIMM_B16 = "ViT-B-16-timm-droppath"
PASS, FAIL, INFO, SKIP, ERROR = "PASS", "FAIL", "INFO", "SKIP", "ERROR"


def _judged(ok: bool) -> str:
    return PASS if ok else FAIL


def spec_bf16_peak(card: str) -> float | None:
    return next((peak for key, peak in SPEC_BF16_DENSE if key.lower() in card.lower()), None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the same code on a CPU with tiny models, about a minute")
    p.add_argument("--budget-s", type=float, help="stop here, whatever is left (default 450; --tiny 240)")
    p.add_argument("--train-steps", type=int, help="steps of the training run, even (default 300; --tiny 12)")
    p.add_argument("--batch-size", type=int, help="batch of the training run (default 128; --tiny 8)")
    p.add_argument("--models", help="throughput models, comma-separated (default ViT-B-16,ViT-B-32; --tiny "
                                    "tiny-vit-32; empty: no throughput rows)")
    p.add_argument("--num-workers", type=int, help="loader workers (default: cores - 2, at most 12; --tiny 0)")
    p.add_argument("--samples", type=int, help="synthetic training samples (default 4096; --tiny 128)")
    p.add_argument("--sections", default="", help="only these sections, comma-separated (default all: "
                                                  "card,process_group,defaults,train,export,search,decode,throughput)")
    p.add_argument("--work", default=str(REPO / "runs" / "gpu_check"), help="shards and runs (default runs/gpu_check)")
    p.add_argument("--out", default="", help="JSON results (default WORK/gpu_check.json)")
    args = p.parse_args(argv)
    defaults = dict(budget_s=450.0, train_steps=300, batch_size=128, models="ViT-B-16,ViT-B-32", samples=4096,
                    num_workers=max(1, min(12, (os.cpu_count() or 2) - 2)))
    if args.tiny:
        defaults.update(budget_s=240.0, train_steps=12, batch_size=8, models="tiny-vit-32", samples=128,
                        num_workers=0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_steps < 2 or args.train_steps % 2:
        p.error("--train-steps must be even and >= 2 (the run checkpoints and resumes at its middle step)")
    args.out = args.out or str(Path(args.work) / "gpu_check.json")
    return args


# ---------------------------------------------------------------- the report and the time budget

class OutOfTime(BaseException):
    """Raised in the main thread when the budget is spent (a BaseException: library code's `except Exception`
    must not swallow it)."""


@dataclasses.dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    card: str
    world: object
    work: Path
    deadline: float
    rows: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    peaks: dict = dataclasses.field(default_factory=dict)
    shards: dict = dataclasses.field(default_factory=dict)
    trained: dict = dataclasses.field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, section: str, check: str, result: str, goal: str = "", status: str = INFO) -> None:
        self.rows.append({"section": section, "check": check, "result": result, "goal": goal, "status": status})

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "device": self.card, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": self.args.tiny,
            "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]), "settings": vars(self.args),
            "rows": self.rows, "sections": self.details}, indent=2, default=str))


def run_section(check: Check, name: str, fn, *, needs_s: float) -> None:
    """Run one section: skipped if the budget cannot hold it, its error in a row if it raises."""
    left = check.left()
    if left < needs_s:
        check.row(name, name, f"skipped: {max(0.0, left):.0f} s of the budget left, it needs about {needs_s:.0f} s",
                  status=SKIP)
        return
    t0 = time.perf_counter()
    try:
        check.details[name] = fn(check) or {}
    except OutOfTime:
        check.row(name, name, f"stopped at the time budget ({check.args.budget_s:.0f} s)", status=ERROR)
    except Exception as e:  # one section's failure is a row of the table, not the end of the check
        first = (str(e).strip().splitlines() or [""])[0][:160]
        check.row(name, name, f"{type(e).__name__}: {first}", status=ERROR)
        check.details[name] = {"error": traceback.format_exc()}
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        check.details.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 1)
        gt.release(check.device)
        check.save()


def print_table(check: Check) -> None:
    widths = [14, 30, 92, 24, 6]
    head = ("section", "check", "result", "goal", "status")
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    for r in check.rows:
        cells = [r["section"], r["check"], r["result"], r["goal"], r["status"]]
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    print(f"\n{check.card}, torch {torch.__version__}; results: {check.args.out}")


# ---------------------------------------------------------------- watching a training run from outside

def _call_site() -> str:
    """Where a host sync came from: the innermost frame outside torch (our code or a library's), and the torch
    frame under it if there is one (not the watching machinery's frames)."""
    skip = ("warnings.py", "contextlib.py", "gpu_throughput.py", "gpu_check.py", "_python_dispatch.py")
    frames = [f for f in traceback.extract_stack() if not f.filename.endswith(skip)]

    def name(frame) -> str:
        return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} {frame.name}"

    outside = next((f for f in reversed(frames) if "/torch/" not in f.filename), None)
    inner = frames[-1] if frames else None
    if outside is None or inner is None:
        return name(inner) if inner else "?"
    return name(outside) if inner is outside else f"{name(outside)} > {name(inner)}"


class RunWatch:
    """What one contrastive.train.train() call did, seen from outside: its engine, the precision and TF32 state
    of its first forward, whether its batches came pinned, and each host sync with the step it belongs to (the
    step a train_step call runs, or the step a batch is moved to the device for)."""

    def __init__(self):
        self.engine = None
        self.forward: dict | None = None
        self.pinned: list[bool] = []
        self.syncs: list[tuple[int, str]] = []
        self.calls = 0
        self.step = 0
        self.paused = False

    def hit(self) -> None:
        if not self.paused:
            self.syncs.append((self.step, _call_site()))

    def on_visual_forward(self, module, inputs, output) -> None:
        if self.forward is not None or not module.training:
            return
        kind = output.device.type
        self.forward = {"autocast": torch.is_autocast_enabled(kind), "autocast_dtype": str(torch.get_autocast_dtype(kind)),
                        "param_dtype": str(next(module.parameters()).dtype), "output_dtype": str(output.dtype),
                        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                        "float32_matmul_precision": torch.get_float32_matmul_precision(),
                        "tf32_cudnn": torch.backends.cudnn.allow_tf32}

    def precision(self) -> str:
        f = self.forward or {}
        if f.get("param_dtype") == "torch.bfloat16":
            return "bf16"
        if f.get("param_dtype") == "torch.float16":
            return "fp16"
        if f.get("autocast") and "bfloat16" in f.get("autocast_dtype", ""):
            return "amp_bf16"
        return "fp32" if f else "unknown"

    def tf32(self) -> bool:
        f = self.forward or {}
        return bool(f.get("tf32_matmul") or f.get("float32_matmul_precision") in ("high", "medium"))


def _pinned(images) -> bool | None:
    """Whether a batch's pixels wait in pinned memory: a tensor, or a JpegBatch's worker-decoded pixels
    (data.decode_on_device; its JPEG bytes are read on the host and stay unpinned by design)."""
    pixels = images if isinstance(images, torch.Tensor) else getattr(images, "pixels_PCHW", None)
    if pixels is None or pixels.device.type != "cpu":
        return None
    return bool(pixels.is_pinned())


def _all_pinned(watch: RunWatch) -> bool | None:
    seen = [p for p in watch.pinned if p is not None]
    return all(seen) if seen else None


def _patch(undo: list, owner, name: str, make) -> None:
    if name in vars(owner):
        original = vars(owner)[name]
        setattr(owner, name, make(original))
        undo.append((owner, name, original))


@contextlib.contextmanager
def watched(device: torch.device, watch: RunWatch, *, count_syncs: bool):
    """Wrap the functions train() calls (looked up when called, so wrapping the module attributes suffices)."""
    import contrastive.data as data_mod
    import contrastive.engine as engine_mod
    import contrastive.train as train_mod

    def wrap_build_engine(original):
        def build_engine(model, *args, **kwargs):
            built = original(model, *args, **kwargs)
            watch.engine = built[0]
            visual = getattr(built[0].module, "visual", None)
            if visual is not None:
                visual.register_forward_hook(watch.on_visual_forward)
            return built
        return build_engine

    def wrap_train_step(original):
        def train_step(*args, **kwargs):
            watch.calls += 1
            watch.step = watch.calls
            return original(*args, **kwargs)
        return train_step

    def wrap_to_device(original):
        def to_device(self, images, *args, **kwargs):
            watch.step = watch.calls + 1
            if device.type == "cuda":
                watch.pinned.append(_pinned(images))
            return original(self, images, *args, **kwargs)
        return to_device

    def wrap_batches(original):
        # On a CPU the loader runs in this process (--tiny has no workers) and reads CPU tensors it owns, which
        # no GPU would wait for: not counted. On a GPU the sync debug mode only sees real device syncs.
        def batches_with_keys(self, *args, **kwargs):
            batches = original(self, *args, **kwargs)
            while True:
                watch.paused = True
                try:
                    item = next(batches)
                except StopIteration:
                    return
                finally:
                    watch.paused = False
                yield item
        return batches_with_keys

    undo: list = []
    try:
        for owner in (engine_mod, train_mod):
            _patch(undo, owner, "build_engine", wrap_build_engine)
        _patch(undo, train_mod, "train_step", wrap_train_step)
        _patch(undo, data_mod.TrainLoader, "to_device", wrap_to_device)
        if device.type != "cuda":
            _patch(undo, data_mod.TrainLoader, "batches_with_keys", wrap_batches)
        with gt.host_sync_watch(device, watch.hit) if count_syncs else contextlib.nullcontext():
            yield watch
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def train_watched(check: Check, cfg, run_dir: Path, *, count_syncs: bool) -> tuple[RunWatch, list[dict], float]:
    """train(cfg) into a fresh run_dir under watch; returns the watch, the metrics records and the seconds."""
    from contrastive.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    watch = RunWatch()
    t0 = time.perf_counter()
    with watched(check.device, watch, count_syncs=count_syncs):
        train(cfg, run_dir, progress=False)
    gt.synchronize(check.device)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return watch, records, seconds


def resolved(cfg, device: torch.device):
    """The config train() trains with (its `auto` values chosen for the device), where the tree has them."""
    import contrastive.config as config_mod

    resolve = getattr(config_mod, "resolve_auto", None)
    return resolve(cfg, cuda=device.type == "cuda") if resolve else cfg


def host_read_steps(cfg) -> set[int]:
    """Steps at which the loop reads the device on purpose (contrastive.train.host_reads_at where it exists),
    for a resolved config."""
    import contrastive.train as train_mod

    reads_at = getattr(train_mod, "host_reads_at", None)
    if reads_at is not None:
        return {s for s in range(1, cfg.train.steps + 1) if reads_at(s, cfg)}
    t = cfg.train
    return {s for s in range(1, t.steps + 1) if t.sync_every == 1 or not s % t.sync_every or not s % t.log_every
            or not s % t.checkpoint_every or s == t.steps or (cfg.eval.every and not s % cfg.eval.every)}


def sync_summary(watch: RunWatch, cfg) -> dict:
    """Host syncs by kind of step: the first (warm-up), the steps that read the device on purpose, the rest."""
    reads = host_read_steps(cfg)
    between_steps = [s for s in range(2, cfg.train.steps + 1) if s not in reads]
    between = [(s, site) for s, site in watch.syncs if s in set(between_steps)]
    sites: dict[str, int] = {}
    for _, site in between or watch.syncs:
        sites[site] = sites.get(site, 0) + 1
    return {"total": len(watch.syncs), "first_step": sum(s <= 1 for s, _ in watch.syncs),
            "at_read_steps": sum(s in reads and s > 1 for s, _ in watch.syncs), "between": len(between),
            "between_steps": len(between_steps),
            "between_per_step": len(between) / max(1, len(between_steps)),
            "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:8])}


# ---------------------------------------------------------------- data and configs

def make_shards(check: Check) -> dict:
    if check.shards:
        return check.shards
    from contrastive.data_prep.synthetic import generate

    size = 32 if check.args.tiny else 224
    out = check.work / f"shards_{size}px_{check.args.samples}"
    specs = generate(out, num_samples=check.args.samples, num_val=max(32, check.args.samples // 8), seed=0,
                     image_size=size, samples_per_shard=max(16, check.args.samples // 16), progress=False)
    check.shards = {"train": specs["train"], "val": specs["val"], "image_size": size}
    return check.shards


def register_timm_b16(work: Path) -> str:
    """ViT-B/16 (open_clip's text tower and widths) with timm's ViT-B/16 image tower and stochastic depth: a
    model whose training draws on the CUDA RNG."""
    import open_clip

    from contrastive.models import get_open_clip_config

    arch = get_open_clip_config("ViT-B-16")
    arch["vision_cfg"] = {"image_size": 224, "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                          "timm_pool": "token", "timm_proj": "linear", "timm_drop_path": 0.1}
    path = work / "model_configs" / f"{TIMM_B16}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arch, indent=2))
    open_clip.add_model_config(path)
    return TIMM_B16


def train_config(check: Check, *, resume: str = ""):
    from contrastive.config import EvaluatorConfig, load_config

    a, shards = check.args, make_shards(check)
    # Reads on purpose every `every` steps (log, train.sync_every); the steps between must not wait for the device.
    steps, every = a.train_steps, max(2, a.train_steps // 12)
    model = ["model.name=tiny-vit-32", "model.patch_dropout=0.5"] if a.tiny else \
        [f"model.name={register_timm_b16(check.work)}"]
    cfg = load_config(None, [
        f"data.train={shards['train']}", f"data.num_workers={a.num_workers}",
        f"data.shuffle_buffer={64 if a.tiny else 1000}", *model, "deepspeed.precision=amp_bf16",
        f"train.batch_size={a.batch_size}", f"train.steps={steps}", f"train.log_every={every}",
        f"train.sync_every={every}", f"train.checkpoint_every={steps // 2}", "train.keep_checkpoints=2",
        f"eval.every={steps // 2}", f"eval.batch_size={64 if a.tiny else 256}", f"optim.warmup_steps={max(1, steps // 10)}",
        f"train.resume={resume}"])
    cfg.eval.evaluators = [EvaluatorConfig(name="zeroshot", data=shards["val"], label_field="color",
                                           templates=["a {c} shape", "something {c}", "a {c} object"])]
    return cfg


# ---------------------------------------------------------------- sections

def section_card(check: Check) -> dict:
    matmul = gt.matmul_flops_per_s(check.device, tiny=check.args.tiny)
    spec = spec_bf16_peak(check.card) if check.cuda else None
    check.peaks = {"spec": spec, "measured": matmul["flops_per_s"]}
    spec_text = f", {matmul['flops_per_s'] / spec:.0%} of the spec {spec / 1e12:.0f}" if spec else \
        (", no spec peak known for this card" if check.cuda else "")
    check.row("card", check.card, f"bf16 matmul {matmul['flops_per_s'] / 1e12:.1f} TFLOP/s measured "
                                  f"(n={matmul['n']}){spec_text}")
    return {"matmul_bf16": matmul, "spec_bf16_dense": spec}


def section_process_group(check: Check) -> dict:
    import torch.distributed as dist

    import contrastive.distributed as distributed

    config = dist.get_backend_config() if hasattr(dist, "get_backend_config") else dist.get_backend()
    chooser = getattr(distributed, "process_group_backend", None)
    expected = chooser(cuda=check.cuda) if chooser else ("cpu:gloo,cuda:nccl" if check.cuda else "gloo")
    out = {"backend_config": config, "expected": expected, "chooser": chooser is not None}
    try:  # the host-tensor collective a CUDA world needs gloo for (log records, evaluation results, shard counts)
        gathered = [torch.zeros(3) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, torch.arange(3.0))
        out["host_all_gather"] = "ok" if torch.equal(gathered[dist.get_rank()], torch.arange(3.0)) else "wrong values"
    except Exception as e:
        out["host_all_gather"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    if check.cuda:
        try:
            x = torch.ones(3, device=check.device)
            dist.all_reduce(x)
            out["device_all_reduce"] = "ok" if x.sum().item() == 3 * dist.get_world_size() else "wrong values"
        except Exception as e:
            out["device_all_reduce"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    backends_ok = ("cpu:gloo" in config and "cuda:nccl" in config) if check.cuda else "gloo" in config
    ok = backends_ok and all(out.get(k, "ok") == "ok" for k in ("host_all_gather", "device_all_reduce"))
    check.row("process group", "backends, each used once",
              f"{config}; host all_gather {out['host_all_gather']}"
              + (f"; device all_reduce {out['device_all_reduce']}" if check.cuda else ""),
              goal=expected, status=_judged(ok))
    return out


def section_defaults(check: Check) -> dict:
    from contrastive.config import load_config

    shards = make_shards(check)
    steps = 4
    cfg = load_config(None, [f"data.train={shards['train']}", "model.name=tiny-vit-32", "model.patch_dropout=0.5",
                             f"train.batch_size={check.args.batch_size}", f"train.steps={steps}",
                             f"train.log_every={steps}", f"train.checkpoint_every={steps}", "train.keep_checkpoints=1",
                             "eval.evaluators=[]", *(["data.num_workers=0"] if check.args.tiny else [])])
    watch, _, seconds = train_watched(check, cfg, check.work / "defaults_run", count_syncs=True)
    shutil.rmtree(check.work / "defaults_run", ignore_errors=True)
    precision, tf32 = watch.precision(), watch.tf32()
    pinned = _all_pinned(watch)
    cfg = resolved(cfg, check.device)
    syncs = sync_summary(watch, cfg)
    out = {"forward": watch.forward, "precision": precision, "tf32": tf32, "pinned": watch.pinned,
           "sync_every": cfg.train.sync_every, "syncs": syncs, "seconds": seconds}
    if check.cuda:
        check.row("defaults", "precision of a plain run", f"{precision} ({watch.forward})"[:92],
                  goal="amp_bf16 or bf16", status=_judged(precision in ("amp_bf16", "bf16")))
        check.row("defaults", "TF32 matmuls", str(tf32), goal="on", status=_judged(tf32))
        check.row("defaults", "batches pinned (non-blocking)", f"{pinned} ({len(watch.pinned)} batches)",
                  goal="pinned", status=_judged(bool(pinned)))
    else:
        check.row("defaults", "precision, TF32, pinned", f"{precision}, TF32 {tf32}, pinned {pinned} (a CPU run)")
    check.row("defaults", "syncs/step, patch dropout", f"{syncs['total'] / steps:.1f} per step with train.sync_every="
              f"{cfg.train.sync_every}; sites {list(syncs['sites'])[:2]}"[:92])
    return out


def section_train(check: Check) -> dict:
    """The training run, its host syncs, and the resumed run compared with it (the `resume` rows)."""
    a = check.args
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    # Equal means bit for bit only with deterministic kernels (cuDNN's autotuning may pick other ones per run).
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        cfg = train_config(check)
        watch, records, seconds = train_watched(check, cfg, check.work / "run_a", count_syncs=True)
        mid = a.train_steps // 2
        ckpt = check.work / "run_a" / "checkpoints" / f"step_{mid:08d}"
        resumed_cfg = train_config(check, resume=str(ckpt))
        _, resumed_records, resumed_seconds = train_watched(check, resumed_cfg, check.work / "run_b",
                                                            count_syncs=False)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
    check.trained = {"run_dir": check.work / "run_a", "engine": watch.engine, "cfg": cfg}

    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: {k: v for k, v in r.items() if "/" in k} for r in records if any("/" in k for k in r)}
    timed = [r for r in records if "samples_per_s" in r and r["step"] > cfg.train.log_every]
    samples_per_s = (sum(r["samples_per_s"] for r in timed) / len(timed)) if timed else None
    syncs = sync_summary(watch, resolved(cfg, check.device))
    first_loss, last_loss = losses.get(min(losses)), losses.get(max(losses))
    eval_text = "; ".join(f"step {s}: " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in m.items()
                                                     if k.endswith("acc1")) for s, m in sorted(evals.items()))
    ran = max(losses) == a.train_steps and sorted(evals) == [mid, a.train_steps]
    check.row("train", f"{a.train_steps} steps, {watch.precision()}",
              f"{cfg.model.name}, batch {a.batch_size}: loss {first_loss:.3f} -> {last_loss:.3f}, "
              f"{samples_per_s or 0:.0f} samples/s, {seconds:.0f} s; zero-shot {eval_text}"[:92],
              goal="runs, evaluates twice", status=PASS if ran else FAIL)
    sites = f"; sites {list(syncs['sites'])[:2]}" if syncs["between"] else ""
    check.row("train", "host syncs between read steps",
              f"{syncs['between_per_step']:.2f}/step over {syncs['between_steps']} steps ({syncs['at_read_steps']} at "
              f"read steps, {syncs['first_step']} at step 1){sites}"[:92],
              goal="0", status=PASS if syncs["between"] == 0 else FAIL)
    if check.cuda:
        pinned = _all_pinned(watch)
        check.row("train", "TF32, pinned batches", f"TF32 {watch.tf32()}, pinned {pinned}", goal="both on",
                  status=_judged(watch.tf32() and bool(pinned)))

    resumed = {r["step"]: r["loss"] for r in resumed_records if "loss" in r}
    resumed_evals = {r["step"]: {k: v for k, v in r.items() if "/" in k} for r in resumed_records
                     if any("/" in k for k in r)}
    compared = sorted(s for s in resumed if s > mid and s in losses)
    diffs = [abs(resumed[s] - losses[s]) / max(abs(losses[s]), 1e-12) for s in compared]
    max_rel = max(diffs) if diffs else float("nan")
    equal = bool(compared) and all(resumed[s] == losses[s] for s in compared)
    eval_equal = resumed_evals.get(a.train_steps) == evals.get(a.train_steps)
    status = PASS if equal and eval_equal else (INFO if diffs and max_rel <= 1e-6 and eval_equal else FAIL)
    check.row("resume", f"from step {mid}, {len(compared)} logged losses",
              f"{'bit for bit equal' if equal else f'max relative difference {max_rel:.2e}'}; final evaluation "
              f"{'equal' if eval_equal else 'differs'}; resumed run {resumed_seconds:.0f} s",
              goal="equal", status=status)
    return {"losses": losses, "resumed_losses": resumed, "evals": evals, "resumed_evals": resumed_evals,
            "max_rel_diff": max_rel, "equal": equal, "eval_equal": eval_equal, "syncs": syncs,
            "forward": watch.forward, "pinned": watch.pinned, "seconds": seconds, "resumed_seconds": resumed_seconds,
            "samples_per_s": samples_per_s, "model": cfg.model.name}


def _val_batch(bundle, spec: str, num: int):
    """The first `num` readable validation samples: preprocessed images and their captions."""
    from contrastive.data import decode_image, eval_samples

    images, captions = [], []
    for sample in eval_samples(spec):
        if "jpg" in sample and "txt" in sample:
            images.append(bundle.preprocess_val(decode_image(sample["jpg"])))
            captions.append(sample["txt"].decode("utf-8"))
        if len(images) == num:
            break
    return torch.stack(images), captions


@torch.no_grad()
def _embed(model, images, texts, device) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return (model.encode_image(images.to(device), normalize=True).float(),
                model.encode_text(texts.to(device), normalize=True).float())
    finally:
        model.train(was_training)


def section_export(check: Check) -> dict:
    from contrastive.loading import load_for_inference
    from contrastive.export import export

    if not check.trained:
        raise RuntimeError("no trained model: the train section did not finish")
    run_dir, out = check.trained["run_dir"], check.work / "export"
    summary = export(run_dir, "open_clip", out, overwrite=True, progress=False)
    exported, _ = load_for_inference(out)
    from_ckpt, info = load_for_inference(run_dir)
    images, captions = _val_batch(exported, check.shards["val"], 64)
    texts = exported.tokenizer(captions)
    device = check.device
    trained = check.trained["engine"].module
    ref_img, ref_txt = _embed(trained, images, texts, device)
    diffs = {}
    for name, bundle in (("export", exported), ("checkpoint", from_ckpt)):
        img, txt = _embed(bundle.model.to(device), images, texts, device)
        diffs[name] = max(float((img - ref_img).abs().max()), float((txt - ref_txt).abs().max()))
    check.trained["embeddings"] = (ref_img.cpu(), ref_txt.cpu())
    worst = max(diffs.values())
    check.row("export", "export, reload, embed on device",
              f"max |difference| from the trained model: export {diffs['export']:.1e}, checkpoint "
              f"{diffs['checkpoint']:.1e} (step {info.get('step')}, {len(images)} images + captions, fp32)",
              goal="<= 1e-5", status=PASS if worst <= 1e-5 else FAIL)
    return {"max_abs_diff": diffs, "export_check": summary.get("check_max_abs_diff"), "step": info.get("step")}


def section_search(check: Check) -> dict:
    import numpy as np

    device, k = check.device, 10
    gen = torch.Generator().manual_seed(0)
    base = check.trained.get("embeddings")
    dim = base[0].shape[1] if base else 512
    num_index, num_queries = (2_000, 200) if check.args.tiny else (200_000, 2_000)

    def unit(n):
        x = torch.randn(n, dim, generator=gen)
        return x / x.norm(dim=1, keepdim=True)

    # The trained model's image embeddings (near each other, as real galleries are) among random ones; its
    # caption embeddings among the queries.
    index_ND = torch.cat([base[0], unit(num_index - len(base[0]))]) if base else unit(num_index)
    queries_QD = torch.cat([base[1], unit(num_queries - len(base[1]))]) if base else unit(num_queries)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact search is fp32, whatever training set
    try:
        t0 = time.perf_counter()
        scores_QN = queries_QD.to(device) @ index_ND.to(device).T
        ours_D, ours_I = (t.cpu() for t in scores_QN.topk(k, dim=1))
        torch_s = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(index_ND.numpy())
        _, ref_I = index.search(queries_QD.numpy(), k)
        reference = f"faiss-cpu {faiss.__version__} IndexFlatIP"
    except ImportError:
        exact = queries_QD.double() @ index_ND.double().T
        ref_I = exact.topk(k, dim=1).indices.numpy()
        reference = "a float64 reference (faiss is not installed)"
    ours_I = ours_I.numpy()
    agreement = float(np.mean([len(set(o) & set(r)) / k for o, r in zip(ours_I, ref_I)]))
    # A disagreement is a tie when the two lists' differing members score the same in float64 (to 1e-6).
    ties = 0
    for q, (o, r) in enumerate(zip(ours_I, ref_I)):
        extra = set(o) - set(r)
        if extra:
            exact_N = (queries_QD[q].double() @ index_ND.double().T).numpy()
            kth = exact_N[r].min()
            ties += all(abs(exact_N[i] - kth) <= 1e-6 for i in extra)
    disagreeing = int(sum(set(o) != set(r) for o, r in zip(ours_I, ref_I)))
    ok = disagreeing == ties
    check.row("search", f"top-{k}, {num_queries} queries x {num_index}",
              f"torch on {device.type} vs {reference}: agreement {agreement:.4f}"
              f"{f', {disagreeing} queries differ ({ties} by ties)' if disagreeing else ''}; torch {torch_s:.2f} s",
              goal="agreement 1.0", status=PASS if ok else FAIL)
    return {"agreement": agreement, "disagreeing_queries": disagreeing, "ties": ties, "reference": reference,
            "torch_s": torch_s, "num_index": num_index, "num_queries": num_queries}


def decode_on_device_available() -> bool:
    from contrastive.config import DataConfig

    return "decode_on_device" in {f.name for f in dataclasses.fields(DataConfig)}


def section_decode(check: Check) -> dict:
    """data.decode_on_device: the same JPEG batches (bytes and crop draws from the loader) decoded, cropped and
    resampled on the training device and on the CPU (libjpeg-turbo, which tests/test_decode_on_device.py
    checks against the workers' path); nvJPEG may round differently, so the difference is judged in grey levels."""
    if not decode_on_device_available():
        check.row("decode", "JPEG decode on the device", "skipped: this tree's DataConfig has no decode_on_device key",
                  status=SKIP)
        return {}
    from contrastive.config import load_config
    from contrastive.data import TrainLoader
    from contrastive.models import build_model

    shards = make_shards(check)
    cfg = load_config(None, [f"data.train={shards['val']}", "data.num_workers=0", "data.decode_on_device=true",
                             f"model.name={'tiny-vit-32' if check.args.tiny else 'ViT-B-16'}"])
    bundle = build_model(cfg.model)
    loader = TrainLoader(cfg.data, preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer,
                         batch_size_per_rank=32, seed=0, world=check.world, on_gpu=check.cuda)
    std = torch.tensor(bundle.preprocess_cfg["std"]).reshape(1, 3, 1, 1)
    batches = iter(loader)
    diffs, undecodable = [], 0
    for _ in range(2):
        images, _ = next(batches)
        on_device = loader.to_device(images, check.device, torch.float32).cpu()
        on_cpu = loader.to_device(images, torch.device("cpu"), torch.float32)
        diffs.append(((on_device - on_cpu).abs() * std * 255).flatten())
        undecodable = loader.num_undecodable_on_device
    grey = torch.cat(diffs)
    mean, worst = float(grey.mean()), float(grey.max())
    check.row("decode", "JPEG decode on the device",
              f"{check.device.type} vs CPU decode of the same 64 crops: mean {mean:.3f}, max {worst:.1f} grey levels; "
              f"{undecodable} left undecoded", goal="mean <= 1 grey level",
              status=PASS if mean <= 1.0 and undecodable == 0 else FAIL)
    return {"mean_grey_levels": mean, "max_grey_levels": worst, "undecodable": undecodable}


def section_throughput(check: Check, model_name: str) -> dict:
    a, shards = check.args, make_shards(check)
    check.trained.pop("engine", None)  # the trained run's weights and optimizer would count in peak memory
    targs = gt.parse_args(["--models", model_name, "--variants", "fast", "--no-max-batch", "--no-e2e", "--work",
                           str(check.work / "throughput"), "--shards", shards["train"],
                           *(["--tiny"] if a.tiny else []), *([] if a.tiny else ["--num-workers", str(a.num_workers)])])
    if check.cuda:  # as open_clip_train's main() sets, for both sides (gpu_throughput.main does the same)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    result = gt.bench_model(targs, model_name, check.world, check.device, check.peaks["measured"])
    flops, batch, spec = result["flops_per_step"], targs.batch_size, check.peaks.get("spec")

    def mfu_spec(samples_per_s):
        return flops * samples_per_s / batch / spec if spec else None

    step = result["step"]
    ours, theirs = step["fast"], step["open_clip"]
    for row in step.values():
        row["mfu_spec"] = mfu_spec(row["samples_per_s"])
    spec_text = f"{ours['mfu_spec']:.1%} of spec, " if spec else ""
    judged = check.cuda and model_name in ("ViT-B-16", "ViT-B-32")
    ratio_ok = ours["vs_open_clip"] >= 1.3 and (model_name != "ViT-B-16" or (ours["mfu_spec"] or 0) >= 0.35)
    check.row(f"{model_name}", "step: ours fast vs open_clip",
              f"{ours['samples_per_s']:.0f} vs {theirs['samples_per_s']:.0f} samples/s = {ours['vs_open_clip']:.2f}x; "
              f"MFU {spec_text}{ours['mfu']:.1%} of measured; syncs/step {ours['host_syncs_per_step']:.2f}",
              goal=">= 1.3x" + (", MFU >= 35% spec" if model_name == "ViT-B-16" else ""),
              status=(PASS if ratio_ok else FAIL) if judged else INFO)

    ours_rows = {"fast": []}
    decode = decode_on_device_available()
    if decode:
        ours_rows = {"fast": ["data.decode_on_device=false"], "fast+decode_on_device": ["data.decode_on_device=true"]}
    e2e = gt.end_to_end(targs, model_name, shards["train"], check.world, check.device, ours=ours_rows,
                        mfu=lambda sps: flops * sps / batch / check.peaks["measured"])
    fast = e2e["fast"]
    check.row(f"{model_name}", "end to end: ours vs open_clip",
              f"{fast['samples_per_s']:.0f} vs {e2e['open_clip']['samples_per_s']:.0f} samples/s = "
              f"{fast['vs_open_clip']:.2f}x (step alone {ours['vs_open_clip']:.2f}x); data wait "
              f"{fast['data_wait_s_per_step'] * 1e3:.0f} ms/step", goal=">= the step's ratio",
              status=(PASS if fast["vs_open_clip"] >= ours["vs_open_clip"] else FAIL) if check.cuda else INFO)
    if decode:
        on = e2e["fast+decode_on_device"]
        check.row(f"{model_name}", "end to end: GPU JPEG decode",
                  f"decode on the device {on['samples_per_s']:.0f} vs off {fast['samples_per_s']:.0f} samples/s "
                  f"= {on['samples_per_s'] / fast['samples_per_s']:.2f}x; data wait "
                  f"{on['data_wait_s_per_step'] * 1e3:.0f} ms/step")
    else:
        check.row(f"{model_name}", "end to end: GPU JPEG decode",
                  "skipped: this tree's DataConfig has no decode_on_device key yet", status=SKIP)
    result["end_to_end"] = e2e
    return result


# ---------------------------------------------------------------- main

SECTIONS = ("card", "process_group", "defaults", "train", "export", "search", "decode", "throughput")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # as gpu_throughput --tiny: a shared machine's other processes cannot stall a step
    device, card = gt.device_and_name(args.tiny)
    from contrastive.engine import device_for, init_distributed

    world = init_distributed()  # what `contrastive train` starts, so the process-group row sees its backends
    device_for(world)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args=args, device=device, card=card, world=world, work=work,
                  deadline=time.monotonic() + args.budget_s)
    wanted = [s for s in (args.sections.split(",") if args.sections else SECTIONS) if s]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown --sections {unknown}; choose from {', '.join(SECTIONS)}")

    def out_of_time(signum, frame):
        raise OutOfTime()

    def last_resort():  # a hang in C code (a collective, a driver call) never returns to Python's signal handler
        print(f"\ngpu_check: still running {args.budget_s + 60:.0f} s in; the table so far:", flush=True)
        print_table(check)
        check.save()
        os._exit(3)

    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    watchdog = threading.Timer(args.budget_s + 60, last_resort)
    watchdog.daemon = True
    watchdog.start()
    # Rough seconds each section needs on an H100/H200 (--tiny: a tenth); a section is skipped below that.
    scale = 0.1 if args.tiny else 1.0
    plan = [("card", section_card, 5), ("process_group", section_process_group, 5),
            ("defaults", section_defaults, 20), ("train", section_train, 120), ("export", section_export, 15),
            ("search", section_search, 5), ("decode", section_decode, 10)]
    try:
        for name, fn, needs in plan:
            if name in wanted:
                run_section(check, name, fn, needs_s=needs * scale)
        if "throughput" in wanted:
            for model_name in [m for m in args.models.split(",") if m]:
                run_section(check, model_name, lambda c, m=model_name: section_throughput(c, m), needs_s=120 * scale)
    except OutOfTime:  # between sections
        check.row("budget", "", f"stopped at the time budget ({args.budget_s:.0f} s)", status=ERROR)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        watchdog.cancel()
    check.save()
    print_table(check)
    return 1 if any(r["status"] in (FAIL, ERROR) for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
