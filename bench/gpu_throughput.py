"""Training throughput and MFU on one GPU: our step against open_clip's, on the same card in the same run.

For each model (random init, 224 px), in one process:

    matmul      the card's bf16 matmul rate, measured first (best of a few large square matmuls): the peak for MFU
    flops       FLOPs of one training step (forward, loss, backward) of the real model at the batch size, counted
                by torch.utils.flop_counter.FlopCounterMode; MFU = flops per step x steps/s / measured bf16 rate
    step        batches already on the device, so only the step is timed:
                  open_clip       open_clip_train.train.train_one_epoch, its own step, set up as open_clip_train's
                                  main() does for --precision amp_bf16 --torchcompile --local-loss --gather-with-grad
                                  (torch.compile of the whole model, AdamW without decay on gains/biases, ClipLoss)
                  ours, a ladder from `contrastive train` with deepspeed.precision=bf16 to the fast settings, each
                  rung adding one change (so neighbouring rows measure it); all run contrastive.train.train_step on
                  the DeepSpeed engine of contrastive.engine.build_engine, as `contrastive train` does:
                    bf16                 deepspeed.precision=bf16 (DeepSpeed's bf16 weights and optimizer wrapper)
                    amp_bf16             deepspeed.precision=amp_bf16 (fp32 weights, bf16 autocast, fused AdamW
                                         stepped by DeepSpeed directly, torch's multi-tensor gradient clipping)
                    amp_bf16+sync        + train.sync_every=N (the host reads the loss every N steps, not each)
                    fast                 + model.compile=true (torch.compile of both towers)
                  and two ablations of `fast` that put back what build_engine removes:
                    fast-ds_clip         DeepSpeed's own gradient clipping (per-parameter norms, host copies)
                    fast-ds_allreduce    DeepSpeed's flatten/all-reduce/copy of every gradient on a single rank
    end to end  from pre-resized shards (synthetic 224 px JPEGs unless --shards): `fast` through
                contrastive.train.train() itself (our loader, logging, checkpointing), against open_clip's
                train_one_epoch fed by open_clip_train's WebDataset pipeline, rebuilt with webdataset 1.x's API.
                Both sides are timed alike: --warmup steps first (loader start-up, shuffle-buffer fill and
                compilation fall there, and are reported as warmup_s), then --steps timed steps; with
                --e2e-rounds N the two sides alternate N times and each row is the median round
    max batch   the largest per-GPU batch whose step fits with loss.name=infonce_tiled (fast settings, eager)

Our rows run with train.dedupe_captions=false: open_clip has no such option, and web captions do not repeat
(the synthetic shards' captions do, and deduplicating them would also change the text batch's shape from step
to step, which makes a compiled text tower compile again at the second step).

Every row reports samples/s, the ratio to open_clip's in this run, MFU, peak memory and host syncs per step
(CUDA's sync debug mode on a GPU; on a CPU, the tensor-to-host reads that would wait for a GPU, which also
counts reads that cost nothing on a GPU, such as non-fused AdamW's step counters, and misses blocking
host-to-device copies). Results go to a JSON file whose path is printed.

    python bench/gpu_throughput.py                        # both models, every row (each compiled row compiles)
    python bench/gpu_throughput.py --models ViT-B-16 --no-max-batch
    python bench/gpu_throughput.py --tiny                 # the same code on a CPU, tiny model: a minute or two
    python bench/gpu_throughput.py --tiny --e2e-rounds 3 --no-max-batch --variants fast
                                                          # the step and end-to-end ratios of `fast` on a CPU
    python bench/gpu_throughput.py --tiny --models ViT-B-32 --batch-size 4 --no-e2e --no-max-batch
                                                          # host syncs per step of the real model, on a CPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if __name__ == "__main__" and "--tiny" in sys.argv[1:]:  # the CPU smoke run: hide GPUs before torch/DeepSpeed look
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.utils._python_dispatch  # noqa: E402

# Our rungs: config overrides ({sync_every} filled in from --sync-every), and the build_engine change undone.
FAST = ["deepspeed.precision=amp_bf16", "train.sync_every={sync_every}", "model.compile=true"]
OUR_VARIANTS = {
    "bf16": (["deepspeed.precision=bf16"], None),
    "amp_bf16": (["deepspeed.precision=amp_bf16"], None),
    "amp_bf16+sync": (["deepspeed.precision=amp_bf16", "train.sync_every={sync_every}"], None),
    "fast": (FAST, None),
    "fast-ds_clip": (FAST, "ds_clip"),
    "fast-ds_allreduce": (FAST, "ds_allreduce"),
}
GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="open_clip model configs, comma-separated (default ViT-B-32,ViT-B-16)")
    p.add_argument("--batch-size", type=int, help="per-GPU batch of the timed steps (default 256)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 10)")
    p.add_argument("--steps", type=int, help="timed steps per row (default 40)")
    p.add_argument("--variants", default=",".join(OUR_VARIANTS),
                   help=f"our rows (default all: {', '.join(OUR_VARIANTS)})")
    p.add_argument("--sync-every", type=int, help="train.sync_every of the +sync rows (default 10)")
    p.add_argument("--loss", default="infonce", help="our loss.name for the step rows (default infonce)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="gradient clipping on both sides (our optim.grad_clip default; default 1.0)")
    p.add_argument("--compile-backend", help="torch.compile backend, both sides (default inductor)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end rows")
    p.add_argument("--shards", default="", help="pre-resized shards for end to end (default: synthetic, made once)")
    p.add_argument("--e2e-samples", type=int, help="synthetic shard samples to make (default 4096)")
    p.add_argument("--e2e-rounds", type=int, default=1,
                   help="end-to-end rounds, open_clip and ours alternating; rows are the median round (default 1)")
    p.add_argument("--num-workers", type=int, help="loader workers on both sides (default: cores - 2, at most 12)")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false", help="skip the largest-batch search")
    p.add_argument("--max-batch-limit", type=int, help="stop the search there (default 65536)")
    p.add_argument("--max-batch-step", type=int, help="granularity of the search (default 64)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_gpu"),
                   help="shards and run folders (default runs/bench_gpu)")
    p.add_argument("--out", default="", help="JSON results (default WORK/gpu_throughput.json)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 `fast` steps per model: WORK/profile_MODEL.json (Chrome trace), .txt (top ops)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads, both sides (default: torch's own; --tiny: 1, so that other processes on a "
                        "shared machine cannot stall one of a step's OpenMP threads and with it the whole step)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU run, by default a smoke run: tiny-vit-32, batch 8, 3 warmup and 12 timed steps, sync every "
                        "2, compile backend eager, 64 synthetic 32 px samples, no loader workers, 1 thread, batch "
                        "search up to 16 in steps of 8")
    args = p.parse_args(argv)
    defaults = dict(models="ViT-B-32,ViT-B-16", batch_size=256, warmup=10, steps=40, sync_every=10,
                    compile_backend="inductor", e2e_samples=4096, max_batch_limit=65536, max_batch_step=64,
                    num_workers=max(1, min(12, (os.cpu_count() or 2) - 2)))
    if args.tiny:
        # 3 warmup steps: the first compiles, and the timed window must hold more than a step or two to
        # say anything on a CPU whose other tenants come and go. One loader worker per side, as every real run
        # loads: with none, loading and stepping take turns and the end-to-end ratio is by construction a blend
        # of the two loaders' ratio and the two steps' (--num-workers 0 shows that, with CPU-clock ratios).
        defaults.update(models="tiny-vit-32", batch_size=8, warmup=3, steps=24, sync_every=2, compile_backend="eager",
                        e2e_samples=64, num_workers=1, max_batch_limit=16, max_batch_step=8, threads=1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or str(Path(args.work) / "gpu_throughput.json")
    unknown = [v for v in args.variants.split(",") if v and v not in OUR_VARIANTS]
    if unknown:
        p.error(f"unknown --variants {unknown}; choose from {', '.join(OUR_VARIANTS)}")
    if args.e2e_rounds < 1:
        p.error("--e2e-rounds must be >= 1")
    return args


# ---------------------------------------------------------------- device helpers

def device_and_name(tiny: bool) -> tuple[torch.device, str]:
    if torch.cuda.is_available() and not tiny:
        return torch.device("cuda", 0), torch.cuda.get_device_name(0)
    if not tiny:
        sys.exit("no GPU visible: this benchmark needs one (use --tiny for the CPU smoke run)")
    import platform

    return torch.device("cpu"), f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled code of the last model goes, so no row runs into dynamo's recompile limit


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def matmul_flops_per_s(device: torch.device, *, tiny: bool) -> dict:
    """The best measured bf16 matmul rate over a few square sizes (the denominator of MFU)."""
    sizes, iters = ((256,), 3) if tiny else ((4096, 8192, 16384), 30)
    best = {"flops_per_s": 0.0}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        out = torch.empty_like(a)
        for _ in range(3):
            torch.matmul(a, b, out=out)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        synchronize(device)
        rate = 2 * n ** 3 * iters / (time.perf_counter() - t0)
        if rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "n": n}
        del a, b, out
    return best


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Calls `on_read()` at each tensor -> Python number read (item(), bool(), float(), tolist() of one element...)."""

    def __init__(self, on_read):
        super().__init__()
        self.on_read = on_read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            self.on_read()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_sync_watch(device: torch.device, on_sync):
    """Calls `on_sync()` at each host sync while the block runs: CUDA's sync debug mode on a GPU (each
    synchronizing CUDA operation); on a CPU, the reads that would wait for a GPU there: scalar reads (item(),
    bool(), float()) and tolist()/cpu()/numpy() of a tensor. Other warnings pass through as usual."""
    if device.type != "cuda":
        patched = {}

        def counting(name):
            def method(self, *args, **kwargs):
                on_sync()
                return patched[name](self, *args, **kwargs)
            return method

        own = {name: name in vars(torch.Tensor) for name in ("tolist", "cpu", "numpy")}
        for name in own:
            patched[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, counting(name))
        try:
            with _ScalarReads(on_sync):
                yield
        finally:
            for name, method in patched.items():
                setattr(torch.Tensor, name, method) if own[name] else delattr(torch.Tensor, name)
        return
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                on_sync()
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.filterwarnings("always", message=".*synchroniz")  # every one, not once per place
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def count_host_syncs(device: torch.device, run) -> int:
    """Host syncs while `run()` runs (see host_sync_watch); the device is drained outside the count."""
    count = [0]

    def hit():
        count[0] += 1

    with host_sync_watch(device, hit):
        run()
    synchronize(device)
    return count[0]


# ---------------------------------------------------------------- FLOPs

def _cpu_sdpa_flops():
    """flop_counter has no formula for the CPU flash-attention kernels; count them as it counts the CUDA ones."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    forward = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)  # noqa: E731
    backward = lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: \
        sdpa_backward_flop_count(grad_out, q, k, v)  # noqa: E731
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_step_flops(model, batch, *, loss_fn, max_logit_scale: float, device: torch.device) -> int:
    """FLOPs of one forward + loss + backward of `model` on `batch`, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from contrastive.train import _loss

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter:
        with autocast:
            out = model(*batch)
            loss = _loss(loss_fn, out, None)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def analytic_step_flops(arch: dict, batch: int) -> int:
    """The same count by hand from an open_clip ViT config, with flop_counter's conventions: 2 FLOPs per
    multiply-add; backward twice the forward, except the patch embedding (no input gradient) and attention
    (which recomputes the scores: 5 matmuls for the forward's 2); the loss's two B x B x D logit matmuls."""
    vision, text, dim = arch["vision_cfg"], arch["text_cfg"], arch["embed_dim"]

    def tower(tokens, width, layers, mlp_ratio):
        dense = 2 * batch * tokens * width * width * (4 + 2 * mlp_ratio)  # qkv, out proj, two MLP matmuls
        attention = 2 * 2 * batch * tokens * tokens * width
        return layers * (3 * dense + attention * 7 // 2)

    size, patch = vision["image_size"], vision["patch_size"]
    patches = (size // patch) ** 2
    image = tower(patches + 1, vision["width"], vision["layers"], vision.get("mlp_ratio", 4.0))
    image += 2 * 2 * batch * patches * 3 * patch * patch * vision["width"]  # conv1 forward + weight gradient
    image += 3 * 2 * batch * vision["width"] * dim  # projection of the pooled token
    context = text.get("context_length", 77)
    words = tower(context, text["width"], text["layers"], text.get("mlp_ratio", 4.0))
    words += 3 * 2 * batch * text["width"] * dim
    loss = 3 * 2 * (2 * batch * batch * dim)
    return int(image + words + loss)


# ---------------------------------------------------------------- batches and configs

def device_batches(bundle, *, batch: int, num: int, device, dtype, seed: int = 0) -> list[tuple]:
    """`num` different batches of normalised-looking images and tokenised captions, already on the device."""
    size = bundle.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        images = torch.randn(batch, 3, height, width, generator=gen).to(device, dtype)
        words = torch.randint(0, 1000, (batch, 6), generator=gen).tolist()
        texts = bundle.tokenizer([f"a photo of item {' '.join(map(str, w))} number {i}" for w in words]).to(device)
        out.append((images, texts))
    return out


def our_config(args, model_name: str, overrides: list[str], batch: int, extra: list[str] = ()):
    from contrastive.config import load_config

    filled = [o.format(sync_every=args.sync_every) for o in overrides]
    # No caption dedupe: open_clip has none, and it is no lever on web captions (see the module docstring).
    return load_config(None, [f"model.name={model_name}", f"train.batch_size={batch}", f"loss.name={args.loss}",
                              f"optim.grad_clip={args.grad_clip}", f"model.compile_backend={args.compile_backend}",
                              "eval.evaluators=[]", "train.dedupe_captions=false", *filled, *extra])


def _undo(engine, what: str | None) -> None:
    """Put back a part of DeepSpeed's step that build_engine replaces (for the ablation rows)."""
    if what == "ds_clip":
        engine.__dict__.pop("clip_fp32_gradients", None)  # the instance attribute shadows DeepSpeed's method
    elif what == "ds_allreduce":
        engine.enable_backward_allreduce = True


# ---------------------------------------------------------------- our step

def build_ours(cfg, world, device, undo: str | None = None):
    from contrastive.engine import build_engine
    from contrastive.models import build_model

    torch.manual_seed(cfg.train.seed)
    bundle = build_model(cfg.model)
    engine, _ = build_engine(bundle.model.to(device), cfg, world, lambda step: 1.0)
    _undo(engine, undo)
    return bundle, engine


def run_ours(engine, cfg, batches, num_steps: int) -> None:
    """`num_steps` steps as contrastive.train.train runs them: train_step, and with train.sync_every > 1 the
    device-side counters read on the host every sync_every steps (and after the last)."""
    from contrastive.losses import build_loss
    from contrastive.train import DeviceCounters, train_step

    loss_fn = build_loss(cfg.loss)
    counters = DeviceCounters() if cfg.train.sync_every > 1 else None
    for i in range(num_steps):
        out = train_step(engine, batches[i % len(batches)], loss_fn=loss_fn, max_logit_scale=cfg.model.max_logit_scale,
                         accum_steps=cfg.train.accum_steps, skip_on_device=counters is not None)
        if counters is not None:
            counters.add(out)
            if (i + 1) % cfg.train.sync_every == 0 or i == num_steps - 1:
                counters.read(out)


def time_steps(run, *, warmup: int, steps: int, batch: int, device, sync_probe_steps: int) -> dict:
    """samples/s of `run(n)` over `steps` steps after `warmup` (also on this process's CPU clock), peak memory,
    and host syncs per step."""
    run(warmup)
    synchronize(device)
    reset_peak_memory(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    run(steps)
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak = peak_memory_gib(device)
    syncs = count_host_syncs(device, lambda: run(sync_probe_steps))
    return {"samples_per_s": steps * batch / seconds, "step_s": seconds / steps, "peak_mem_gib": peak,
            "host_syncs_per_step": syncs / sync_probe_steps, "cpu_samples_per_s": steps * batch / cpu_seconds}


def profile_steps(run, *, device, path: Path, num_steps: int = 3) -> dict:
    """torch.profiler over `num_steps` steps: a Chrome trace and a table of the ops that take the most time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run(num_steps)
        synchronize(device)
    trace, table = path.with_suffix(".json"), path.with_suffix(".txt")
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table.write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    return {"trace": str(trace), "table": str(table), "steps": num_steps}


# ---------------------------------------------------------------- open_clip's step

class _Batches:
    """What open_clip_train's train_one_epoch expects of data['train'] (a dataloader with num_batches and
    num_samples, and set_epoch); yields `num` batches from `source` (a list, cycled, or an iterator). The epoch
    it announces is long, so train_one_epoch logs (and reads the loss on the host) only at its first batch, as
    in a real epoch of thousands of steps logged every 100."""

    EPOCH_BATCHES = 10 ** 9

    def __init__(self, source, num: int, batch: int):
        self.source, self.num = source, num
        self.num_batches, self.num_samples = self.EPOCH_BATCHES, self.EPOCH_BATCHES * batch
        self.dataloader = self

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        if isinstance(self.source, list):
            return (self.source[i % len(self.source)] for i in range(self.num))
        return (next(self.source) for _ in range(self.num))


def build_openclip(model_name: str, args, device):
    """Model, transforms, optimizer, loss and args as open_clip_train's main() builds them for
    --precision amp_bf16 --torchcompile --local-loss --gather-with-grad (one process)."""
    import open_clip
    from open_clip_train.scheduler import cosine_lr

    from contrastive.models import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(model_name, precision="amp_bf16", device=device,
                                                                       output_dict=True)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0},
                                   {"params": rest, "weight_decay": 0.2}], lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)
    scheduler = cosine_lr(optimizer, 5e-4, 10, 10 ** 6)
    compiled = torch.compile(model, backend=args.compile_backend)
    train_args = argparse.Namespace(device=str(device), precision="amp_bf16", distill=False, accum_freq=1,
                                    skip_scheduler=False, grad_clip_norm=args.grad_clip or None, horovod=False,
                                    log_every_n_steps=100, rank=0, local_rank=0, world_size=1,
                                    batch_size=args.batch_size, wandb=False)
    return compiled, preprocess_train, optimizer, loss, scheduler, train_args


def run_openclip(parts, source, num_steps: int, batch: int) -> None:
    from open_clip_train.train import train_one_epoch

    model, _, optimizer, loss, scheduler, train_args = parts
    train_one_epoch(model, {"train": _Batches(source, num_steps, batch)}, loss, 0, optimizer, None, scheduler, None,
                    train_args)


# ---------------------------------------------------------------- end to end

def make_shards(args, image_size: int) -> str:
    if args.shards:
        return args.shards
    from contrastive.data_prep.synthetic import generate

    out = Path(args.work) / f"shards_{image_size}px_{args.e2e_samples}"
    return generate(out, num_samples=args.e2e_samples, num_val=0, seed=0, image_size=image_size,
                    samples_per_shard=max(16, args.e2e_samples // 16), progress=False)["train"]


def openclip_wds_loader(spec: str, preprocess, tokenizer, *, batch: int, num_workers: int, tiny: bool):
    """open_clip_train.data.get_wds_dataset's training pipeline (resampled shards, sample shuffle, decode,
    transform, batch) and WebLoader, written with webdataset 1.x's API (its own helpers need webdataset<=0.2)."""
    import braceexpand
    import webdataset as wds

    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(64 if tiny else 5000, initial=16 if tiny else 1000),
        wds.select(lambda s: ("txt" in s) and any(k in s for k in ("png", "jpg", "jpeg", "webp"))),
        wds.decode("pilrgb", handler=wds.warn_and_continue), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]), wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                         persistent_workers=num_workers > 0)


@contextlib.contextmanager
def _records_stamped_with_cpu_clock():
    """metrics.jsonl records also carry this process's CPU clock (cpu_s): with the loader in this process (no
    workers, as --tiny), rates on it are what other processes on a shared machine cannot stretch."""
    from contrastive.metrics import MetricsLogger

    log = MetricsLogger.log
    MetricsLogger.log = lambda self, record: log(self, {**record, "cpu_s": time.process_time()})
    try:
        yield
    finally:
        MetricsLogger.log = log


def e2e_ours(args, model_name: str, spec: str, world, run_dir: Path, extra: list[str] = ()) -> dict:
    """`fast` (+ `extra` overrides) through contrastive.train.train(): samples/s between the log records at the
    end of the warmup and at the end of the timed steps; warmup_s is the first record's clock (train's clock
    starts before the loader's first batch is asked for, so the loader's start-up is in it)."""
    from contrastive.train import train

    window = max(1, args.warmup)
    timed = window * math.ceil(args.steps / window)
    cfg = our_config(args, model_name, OUR_VARIANTS["fast"][0], args.batch_size,
                     [f"data.train={spec}", f"data.num_workers={args.num_workers}", f"train.steps={window + timed}",
                      f"train.log_every={window}", f"train.checkpoint_every={window + timed}",
                      "train.keep_checkpoints=1",
                      "data.shuffle_buffer=64" if args.tiny else "data.shuffle_buffer=1000", *extra])
    shutil.rmtree(run_dir, ignore_errors=True)
    with _records_stamped_with_cpu_clock():
        train(cfg, run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "samples_per_s" in r]
    first, last = records[0], records[-1]
    later = records[1:]
    shutil.rmtree(run_dir, ignore_errors=True)
    samples = (last["step"] - first["step"]) * args.batch_size
    return {"samples_per_s": samples / (last["time_s"] - first["time_s"]),
            "cpu_samples_per_s": samples / (last["cpu_s"] - first["cpu_s"]),
            "data_wait_s_per_step": sum(r["data_wait_s"] for r in later) / len(later),
            "steps": last["step"] - first["step"], "warmup_steps": first["step"], "warmup_s": first["time_s"],
            "dedupe_captions": cfg.train.dedupe_captions}


def e2e_openclip(args, model_name: str, spec: str, device) -> dict:
    """open_clip_train's train_one_epoch fed by its WebDataset pipeline: --warmup steps (the loader's start-up
    and shuffle fill, compilation: warmup_s), then --steps timed steps."""
    import open_clip

    parts = build_openclip(model_name, args, device)
    t_start = time.perf_counter()
    loader = openclip_wds_loader(spec, parts[1], open_clip.get_tokenizer(model_name), batch=args.batch_size,
                                 num_workers=args.num_workers, tiny=args.tiny)
    waited = [0.0]

    def timed(batches):  # the time train_one_epoch waits for its loader: our rows' data_wait_s
        while True:
            t = time.perf_counter()
            batch = next(batches)
            waited[0] += time.perf_counter() - t
            yield batch

    batches = timed(iter(loader))
    run = lambda n: run_openclip(parts, batches, n, args.batch_size)  # noqa: E731
    run(max(1, args.warmup))
    synchronize(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    waited[0] = 0.0
    run(args.steps)
    synchronize(device)
    out = {"samples_per_s": args.steps * args.batch_size / (time.perf_counter() - t0), "steps": args.steps,
           "cpu_samples_per_s": args.steps * args.batch_size / (time.process_time() - cpu0),
           "data_wait_s_per_step": waited[0] / args.steps, "warmup_steps": max(1, args.warmup),
           "warmup_s": t0 - t_start}
    parts = batches = loader = None  # frees the model and the loader's workers
    return out


def _median_round(rounds: list[dict]) -> dict:
    """The round of median samples/s (the lower of the middle two for an even count), with every round's rate."""
    ranked = sorted(rounds, key=lambda r: r["samples_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_samples_per_s": [r["samples_per_s"] for r in rounds]}


def end_to_end(args, model_name: str, spec: str, world, device, *, ours: dict[str, list[str]],
               mfu=None) -> dict:
    """open_clip's end-to-end row and one row of ours per entry of `ours` (name -> extra overrides of `fast`),
    in --e2e-rounds alternating rounds (each row the median round); ratios against open_clip's row."""
    rounds: dict[str, list[dict]] = {"open_clip": [], **{name: [] for name in ours}}
    for _ in range(args.e2e_rounds):
        rounds["open_clip"].append(e2e_openclip(args, model_name, spec, device))
        release(device)
        for name, extra in ours.items():
            rounds[name].append(e2e_ours(args, model_name, spec, world, Path(args.work) / "e2e_run", extra))
            release(device)
    rows = {name: _median_round(r) for name, r in rounds.items()}
    for row in rows.values():
        row["vs_open_clip"] = row["samples_per_s"] / rows["open_clip"]["samples_per_s"]
        row["vs_open_clip_cpu_clock"] = row["cpu_samples_per_s"] / rows["open_clip"]["cpu_samples_per_s"]
        if mfu is not None:
            row["mfu"] = mfu(row["samples_per_s"])
    return {"shards": spec, **rows}


# ---------------------------------------------------------------- largest batch

def max_batch(args, model_name: str, world, device) -> dict:
    """Largest per-GPU batch (multiple of --max-batch-step) whose training step fits with infonce_tiled."""
    tried = []

    def fits(batch: int) -> bool:
        if batch > args.max_batch_limit:
            return False
        ok = True
        try:
            cfg = our_config(args, model_name, ["deepspeed.precision=amp_bf16", "train.sync_every={sync_every}"], batch,
                             ["loss.name=infonce_tiled"])
            bundle, engine = build_ours(cfg, world, device)
            batches = device_batches(bundle, batch=batch, num=1, device=device, dtype=torch.float32)
            reset_peak_memory(device)
            run_ours(engine, cfg, batches, 2)  # the second step holds the optimizer state too
            synchronize(device)
            peak = peak_memory_gib(device)
        except torch.OutOfMemoryError:
            ok, peak = False, None
        finally:
            bundle = engine = batches = None  # noqa: F841 (frees the trial's tensors before the next)
            release(device)
        tried.append({"batch": batch, "fits": ok, "peak_mem_gib": peak})
        return ok

    step = args.max_batch_step
    good, bad = 0, None
    batch = max(step, args.batch_size // step * step)
    while bad is None:
        if fits(batch):
            good, batch = batch, batch * 2
        else:
            bad = batch
    bad = min(bad, args.max_batch_limit // step * step + step)  # above the limit counts as not fitting
    while bad - good > step:
        middle = (good + bad) // 2 // step * step
        if middle <= good:
            break
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    best = next((t for t in tried if t["batch"] == good), None)
    return {"batch": good, "peak_mem_gib": best["peak_mem_gib"] if best else None, "limit": args.max_batch_limit,
            "tried": tried}


# ---------------------------------------------------------------- one model

def bench_model(args, model_name: str, world, device, peak_flops: float) -> dict:
    from contrastive.losses import build_loss
    from contrastive.models import build_model

    result: dict = {"batch_size": args.batch_size}
    cfg = our_config(args, model_name, [], args.batch_size)
    bundle = build_model(cfg.model)
    model = bundle.model.to(device)
    probe = device_batches(bundle, batch=args.batch_size, num=1, device=device, dtype=torch.float32)[0]
    flops = count_step_flops(model, probe, loss_fn=build_loss(cfg.loss), max_logit_scale=cfg.model.max_logit_scale,
                             device=device)
    result.update(flops_per_step=flops, flops_per_sample=flops / args.batch_size,
                  analytic_flops_per_step=analytic_step_flops(bundle.model_cfg, args.batch_size))
    bundle.model = model = probe = None  # only the tokenizer and preprocessing config are used from here on
    release(device)

    def mfu(samples_per_s: float) -> float:
        return flops * samples_per_s / args.batch_size / peak_flops

    probe_steps = max(2, args.sync_every)
    rows = {}
    batches32 = device_batches(bundle, batch=args.batch_size, num=4, device=device, dtype=torch.float32)
    parts = build_openclip(model_name, args, device)
    rows["open_clip"] = time_steps(lambda n: run_openclip(parts, batches32, n, args.batch_size), warmup=args.warmup,
                                   steps=args.steps, batch=args.batch_size, device=device, sync_probe_steps=probe_steps)
    parts = None
    release(device)
    for name in [v for v in args.variants.split(",") if v]:
        overrides, undo = OUR_VARIANTS[name]
        vcfg = our_config(args, model_name, overrides, args.batch_size)
        _, engine = build_ours(vcfg, world, device, undo)
        batches = batches32 if vcfg.deepspeed.precision != "bf16" else \
            [(images.to(torch.bfloat16), texts) for images, texts in batches32]
        rows[name] = time_steps(lambda n: run_ours(engine, vcfg, batches, n), warmup=args.warmup, steps=args.steps,
                                batch=args.batch_size, device=device, sync_probe_steps=probe_steps)
        if args.profile and name == "fast":
            result["profile"] = profile_steps(lambda n: run_ours(engine, vcfg, batches, n), device=device,
                                              path=Path(args.work) / f"profile_{model_name}")
        engine = batches = None
        release(device)
    for row in rows.values():
        row["vs_open_clip"] = row["samples_per_s"] / rows["open_clip"]["samples_per_s"]
        row["vs_open_clip_cpu_clock"] = row["cpu_samples_per_s"] / rows["open_clip"]["cpu_samples_per_s"]
        row["mfu"] = mfu(row["samples_per_s"])
    result["step"] = rows
    result["cpu_clock"] = device.type == "cpu" and args.num_workers == 0
    batches32 = None

    if args.e2e:
        size = bundle.preprocess_cfg["size"]
        spec = make_shards(args, size if isinstance(size, int) else max(size))
        result["end_to_end"] = end_to_end(args, model_name, spec, world, device, ours={"fast": []}, mfu=mfu)
    if args.max_batch:
        result["max_batch_infonce_tiled"] = max_batch(args, model_name, world, device)
    return result


def print_model(name: str, r: dict) -> None:
    # Everything runs in this process on a CPU without loader workers: there the ratio on this process's CPU
    # clock is also printed, which a shared machine's other processes do not move.
    cpu = r.get("cpu_clock", False)
    cpu_head = f"{'x (CPU clock)':>15}" if cpu else ""

    def cpu_ratio(row):
        return f"{row['vs_open_clip_cpu_clock']:>15.2f}" if cpu else ""

    print(f"\n{name}  batch {r['batch_size']}  {r['flops_per_sample'] / 1e9:.2f} GFLOP/sample counted "
          f"({r['analytic_flops_per_step'] / r['batch_size'] / 1e9:.2f} by hand)")
    print(f"  {'step (batches on the device)':<28}{'samples/s':>11}{'x open_clip':>13}{'MFU':>8}{'peak GiB':>10}"
          f"{'syncs/step':>12}{cpu_head}")
    for variant, row in r["step"].items():
        mem = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.1f}"
        print(f"  {variant:<28}{row['samples_per_s']:>11.1f}{row['vs_open_clip']:>13.2f}{row['mfu']:>8.1%}{mem:>10}"
              f"{row['host_syncs_per_step']:>12.2f}{cpu_ratio(row)}")
    if "end_to_end" in r:
        print(f"  {'end to end (from shards)':<28}{'':>11}{'':>13}{'':>8}{'warmup s':>10}{'data ms':>12}{cpu_head}")
        for variant, row in r["end_to_end"].items():
            if variant != "shards":
                print(f"  {variant:<28}{row['samples_per_s']:>11.1f}{row['vs_open_clip']:>13.2f}{row['mfu']:>8.1%}"
                      f"{row['warmup_s']:>10.1f}{row['data_wait_s_per_step'] * 1e3:>12.1f}{cpu_ratio(row)}")
    if "max_batch_infonce_tiled" in r:
        m = r["max_batch_infonce_tiled"]
        mem = "" if m["peak_mem_gib"] is None else f" ({m['peak_mem_gib']:.1f} GiB peak)"
        print(f"  largest per-GPU batch with infonce_tiled: {m['batch']}{mem}"
              f"{' = the search limit' if m['batch'] >= m['limit'] else ''}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, card = device_and_name(args.tiny)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.backends.cuda.matmul.allow_tf32 = True  # as open_clip_train's main() sets, for both sides
    torch.backends.cudnn.benchmark = True
    from contrastive.engine import device_for, init_distributed

    world = init_distributed()
    device_for(world)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    matmul = matmul_flops_per_s(device, tiny=args.tiny)
    results = {"device": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "cuda": torch.version.cuda,
               "command": "python bench/gpu_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "tiny": args.tiny, "matmul_bf16": matmul, "settings": {k: v for k, v in vars(args).items()},
               "models": {}}
    print(f"{card}: bf16 matmul {matmul['flops_per_s'] / 1e12:.1f} TFLOP/s measured (n={matmul['n']}), "
          f"torch {torch.__version__}")
    for name in [m for m in args.models.split(",") if m]:
        results["models"][name] = bench_model(args, name, world, device, matmul["flops_per_s"])
        print_model(name, results["models"][name])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")
    return results


if __name__ == "__main__":
    main()
