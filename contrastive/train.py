"""The training step and the loop that schedules logging, checkpoints, evaluation and preemption around it.

Launch with `contrastive train` directly (1 rank), `torchrun --nproc_per_node N -m contrastive.cli train ...`,
the `deepspeed` launcher, or Slurm's `srun` (ranks from the environment; see engine.init_distributed).
SIGTERM or SIGUSR1 make the run checkpoint at the next step boundary and exit with EXIT_PREEMPTED, so a
scheduler can requeue it and `train.resume=latest` continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from contrastive import checkpoint, resume, rng
from contrastive.config import Config, resolve_auto, save_config, to_dict
from contrastive.data import TrainLoader
from contrastive.distributed import host_all_gather, host_broadcast_object
from contrastive.errors import UserError
from contrastive.evaluators import run_evaluators
from contrastive.losses import build_loss, caption_keys, class_keys, mean_over_captions
from contrastive.metrics import MetricsLogger
from contrastive.preemption import EXIT_PREEMPTED, StopRequest  # noqa: F401 (EXIT_PREEMPTED re-exported)
from contrastive.loading import build_initialised
from contrastive.preflight import check_run_inputs
from contrastive.run_dir import refuse_reused_run_dir
from contrastive.step_plan import (StepPlan, StepTimer, fit_steps, lr_lambda,  # noqa: F401 (lr_lambda re-exported)
                                   reserve_s, worth_refitting)

# The clock of train.max_time_s and of train.fit_steps_to_time's step timing (tests put a fake one here).
budget_clock = time.perf_counter


class TrainingDiverged(UserError):
    pass


def _agreed_on_device(loss: torch.Tensor, stop: bool, group=None) -> torch.Tensor:
    """One all-reduce per step, on the loss's device (NCCL reduces no host tensors) and read by nobody yet:
    [mean loss over ranks, number of ranks asked to stop]."""
    flags = torch.stack([loss.detach().float().reshape(()), torch.full((), float(stop), device=loss.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flags, group=group)
        flags[0] /= dist.get_world_size(group)
    return flags


def _agree(loss: torch.Tensor, stop: bool, group=None) -> tuple[float, bool]:
    """The mean loss over ranks and whether any rank was asked to stop, read on the host (waits for the device)."""
    loss_mean, num_stop = _agreed_on_device(loss, stop, group).tolist()
    return loss_mean, num_stop > 0


def _loss(loss_fn, out: dict, group, *, image_BD=None, text_BD=None, logit_scale=None, keys_B=None):
    """The loss in fp32. The logit scale is not clamped here but as a parameter after each step
    (engine.clamp_logit_scale_), so its gradient stays alive at the cap."""
    scale = (out["logit_scale"] if logit_scale is None else logit_scale).float()
    # K captions per image (data.captions_per_sample) come as K * B text rows: the mean of K losses.
    return mean_over_captions(loss_fn, (out["image_features"] if image_BD is None else image_BD).float(),
                              (out["text_features"] if text_BD is None else text_BD).float(), scale,
                              None if out.get("logit_bias") is None else out["logit_bias"].float(), group=group,
                              **({} if keys_B is None else {"positive_keys_B": keys_B}))


def positive_keys(loss_fn, texts_BL: torch.Tensor, classes_B: torch.Tensor | None = None) -> torch.Tensor | None:
    """The loss's positive_keys_B for loss.positives=caption or class (None for pair)."""
    positives = getattr(loss_fn, "positives", "pair")
    if positives == "class" and classes_B is not None:
        return class_keys(texts_BL, classes_B)
    return caption_keys(texts_BL) if positives != "pair" else None


def distinct_captions(texts_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct token rows U, the row of each sample's caption B): templated or repeated captions are then
    encoded once per batch. Taken from the loader's CPU tokens (torch.unique on a GPU would wait for it)."""
    return torch.unique(texts_BL, dim=0, return_inverse=True)


def text_draws_no_randomness(model: torch.nn.Module) -> bool:
    """Whether the text side of `model` is deterministic in train mode (no dropout), so that encoding each
    distinct caption once gives what encoding every copy would: the same features and the same gradients."""
    visual = getattr(model, "visual", None)
    image_side = set(visual.modules()) if isinstance(visual, torch.nn.Module) else set()
    for module in model.modules():
        if module in image_side:
            continue
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return False
        if isinstance(module, torch.nn.MultiheadAttention) and module.dropout > 0:
            return False
    return True


def train_step(engine, batch, *, loss_fn, max_logit_scale: float = 100.0, accum_steps: int = 1, stop: bool = False,
               group=None, skip_on_device: bool = False) -> dict:
    """Forward, loss over the global batch, backward, update; skips the update if the loss is not finite.

    With accum_steps > 1 the rank's batch is split into micro-batches: features of all of them are computed
    without grad, then each micro-batch is recomputed with grad and its loss taken against the cached
    features of the others (GradCache), so negatives span the whole accumulated global batch and the summed
    gradients equal those of one big step. The logit scale/bias get their gradient from one micro-step only.

    skip_on_device (train.sync_every > 1): the host never waits for the device; backward always runs and the
    optimizer turns a non-finite step's update into a no-op on the device; "loss", "stop" and "nonfinite" come
    back as device tensors, for DeviceCounters to read now and then.

    After the update the logit scale parameter is clamped to log(max_logit_scale) (collective under ZeRO). With
    fp16 weights, a step DeepSpeed's loss scaler skips (gradient overflow) comes back with "updated" false and
    "loss_scale_skip" true: the caller must not count it as a step, as DeepSpeed did not step the LR schedule.
    """
    from contrastive.engine import clamp_logit_scale_, skip_update_if

    # (images, texts[, positive keys[, text rows]]): see positive_keys; with text rows (distinct_captions),
    # `texts` holds each distinct caption once and sample i's caption is texts[text_rows_B[i]].
    images, texts, *extra = batch
    keys_B = extra[0] if extra and extra[0] is not None else (None if extra else positive_keys(loss_fn, texts))
    text_rows_B = extra[1] if len(extra) > 1 else None
    if text_rows_B is not None and accum_steps > 1:  # micro-batches split the samples: give each its captions
        texts, text_rows_B = texts[text_rows_B], None
    chunks = list(zip(images.chunk(accum_steps), texts.chunk(accum_steps)))
    rng_states, cached = [], []
    if accum_steps > 1:
        with torch.no_grad():
            for img, txt in chunks:
                rng_states.append(rng.capture(images.device))
                out = _forward(engine, img, txt)
                cached.append((out["image_features"], out["text_features"]))
        after = rng.capture(images.device)
    for j, (img, txt) in enumerate(chunks):
        if cached:  # the same dropout/patch-dropout draws as the cached forward, on the CPU and the device
            rng.restore(rng_states[j], images.device)
        out = _forward(engine, img, txt, text_rows_B)
        if cached:
            image_BD = torch.cat([out["image_features"] if i == j else c[0] for i, c in enumerate(cached)])
            text_BD = torch.cat([out["text_features"] if i == j else c[1] for i, c in enumerate(cached)])
            scale = out["logit_scale"] if j == 0 else out["logit_scale"].detach()
            if j > 0 and out.get("logit_bias") is not None:
                out = dict(out, logit_bias=out["logit_bias"].detach())
            loss = _loss(loss_fn, out, group, image_BD=image_BD, text_BD=text_BD, logit_scale=scale, keys_B=keys_B)
        else:
            loss = _loss(loss_fn, out, group, keys_B=keys_B)
        if j == 0 and skip_on_device:
            flags = _agreed_on_device(loss, stop, group)  # the summed loss is non-finite if any rank's is
            skip_update_if(engine, ~torch.isfinite(flags[0]))
            result = {"loss": flags[0], "stop": flags[1] > 0, "nonfinite": ~torch.isfinite(flags[0]), "updated": True}
        elif j == 0:
            loss_global, stop_any = _agree(loss, stop, group)
            result = {"loss": loss_global, "stop": stop_any, "updated": math.isfinite(loss_global)}
            if not result["updated"]:
                break
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    if result["updated"] is True and engine.fp16_enabled() and not engine.was_step_applied():
        result.update(updated=False, loss_scale_skip=True)  # a host read DeepSpeed's fp16 loss scaler made anyway
    clamp_logit_scale_(engine, max_logit_scale=max_logit_scale)
    if cached:
        rng.restore(after, images.device)
    return dict(result, logit_scale=out["logit_scale"].detach().float().reshape(()))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: a copy from pageable memory into CUDA memory
    synchronises the stream first, one from pinned memory does not (the loader's batches are pinned already)."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _forward(engine, images, texts, text_rows_B=None) -> dict:
    out = engine(images, texts)
    if text_rows_B is None:
        return out
    return dict(out, text_features=out["text_features"][text_rows_B])  # backward sums the copies' gradients


class DeviceCounters:
    """Non-finite steps counted on the device between host reads (train.sync_every > 1)."""

    def __init__(self):
        self.nonfinite = self.in_a_row = None

    def add(self, out: dict) -> None:
        bad = out["nonfinite"].float()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        self.in_a_row = bad if self.in_a_row is None else (self.in_a_row + 1) * bad

    def read(self, out: dict) -> tuple[dict, int, int]:
        """One host read, of the last step's `out` (added already): `out` with a float loss and a bool stop,
        the non-finite steps since the last read, and the current run of non-finite steps."""
        assert self.nonfinite is not None, "add(out) comes before read(out)"
        values = torch.stack([out["loss"].float(), out["stop"].float(), self.nonfinite, self.in_a_row]).tolist()
        self.nonfinite = None
        return dict(out, loss=values[0], stop=values[1] > 0), int(values[2]), int(values[3])


def host_reads_at(step: int, cfg: Config, *, total_steps: int | None = None) -> bool:
    """Whether the loop reads the step's results on the host: every train.sync_every steps and wherever it logs,
    checkpoints or evaluates (step counts from 1; `total_steps`: the planned total, train.steps if None)."""
    t = cfg.train
    total_steps = t.steps if total_steps is None else total_steps
    return (t.sync_every == 1 or step % t.sync_every == 0 or step % t.log_every == 0 or step % t.checkpoint_every == 0
            or step >= total_steps or bool(cfg.eval.every and step % cfg.eval.every == 0))


@dataclass
class TrainResult:
    record: dict
    step: int
    preempted: bool = False


def train(cfg: Config, run_dir: Path, *, progress: bool = True, stop: StopRequest | None = None) -> TrainResult:
    """Train per `cfg` into `run_dir` on the ranks of the environment (1 if none). `stop`: a StopRequest
    installed earlier (the CLI installs one before the heavy imports); one is installed here otherwise."""
    from contrastive import wandb_log
    from contrastive.engine import build_engine, clamp_logit_scale_, device_for, freeze, init_distributed
    from contrastive.progress import progress_bar

    # Mistakes in paths and settings fail here, in one line, before any process group or model exists.
    evaluators = check_run_inputs(cfg)
    wandb_log.check_available(cfg.train.log_to)
    cfg = resolve_auto(cfg, cuda=torch.cuda.is_available())
    refuse_reused_run_dir(run_dir, resume=cfg.train.resume)
    resume_from = checkpoint.resolve_checkpoint(run_dir, cfg.train.resume)
    world = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    # Every rank checks the checkpoint and all take the same decision before any collective load.
    try:
        resume_plan = resume.agree_on_resume(resume_from, world=world, zero_stage=cfg.deepspeed.zero_stage,
                                             precision=cfg.deepspeed.precision)
    except UserError:
        dist.destroy_process_group()  # every rank raises here: leaving the group together ends each cleanly
        raise
    device = device_for(world)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_config(cfg, run_dir / checkpoint.CONFIG_FILE)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    bundle = build_initialised(cfg.model)  # model.pretrained's weights, if any
    freeze(bundle.model, cfg.optim.freeze)
    plan = StepPlan.configured(cfg.train.steps)  # the schedule reads it at every step: a fit moves its end
    engine, scheduler = build_engine(bundle.model.to(device), cfg, world, lr_lambda(cfg.optim, plan))
    bundle.model = engine.module
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    loader = TrainLoader(cfg.data, preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer,
                         batch_size_per_rank=cfg.train.batch_size // world.world_size, seed=cfg.train.seed,
                         world=world, on_gpu=device.type == "cuda")
    loss_fn = build_loss(cfg.loss)
    mirrors = ()
    if world.is_main and "wandb" in cfg.train.log_to:
        mirrors = (wandb_log.WandbMirror(run_dir, project=cfg.train.wandb_project, config=to_dict(cfg),
                                         resuming=resume_from is not None),)
    logger = MetricsLogger(run_dir, enabled=world.is_main, tensorboard="tensorboard" in cfg.train.log_to,
                           mirrors=mirrors)

    step, elapsed_before, nonfinite_total, loss_scale_skips = 0, 0.0, 0, 0
    torch.manual_seed(cfg.train.seed * 1000 + world.rank)  # per-rank dropout draws, CPU and CUDA
    if resume_plan is not None:
        # Another world size, ZeRO stage or precision is resharded; this rank's data position and RNG come too.
        shared = resume.restore(resume_plan, engine=engine, scheduler=scheduler, loader=loader, rank=world.rank,
                                device=device)
        step, elapsed_before, nonfinite_total = shared["step"], shared["time_s"], shared["nonfinite_skips"]
        loss_scale_skips = shared.get("loss_scale_skips", 0)
        if cfg.train.fit_steps_to_time and "step_plan" in shared:  # before the next step's lr is computed
            plan.restore(shared["step_plan"], max_steps=cfg.train.steps)
        clamp_logit_scale_(engine, max_logit_scale=cfg.model.max_logit_scale)  # checkpoints of older versions
    if cfg.train.resume:  # also with no checkpoint yet: the records of a run killed before its first one go
        logger.resume_at(step)
    start = budget_clock()

    def elapsed_s() -> float:
        return elapsed_before + budget_clock() - start

    def save(at_step: int) -> Path:
        return checkpoint.save_checkpoint(
            engine, run_dir, step=at_step, rank=world.rank,
            shared_state={"time_s": elapsed_s(), "nonfinite_skips": nonfinite_total,
                          "loss_scale_skips": loss_scale_skips, "zero_stage": cfg.deepspeed.zero_stage,
                          "world_size": world.world_size, **({"step_plan": plan.to_json()} if plan.fitted_at else {})},
            rank_state={"loader": loader.state_dict(), "rng": rng.to_json(rng.capture(device))},
            config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False), model_cfg=bundle.model_cfg,
            preprocess_cfg=bundle.preprocess_cfg, keep=cfg.train.keep_checkpoints)

    stop = stop or StopRequest()
    record: dict = {}
    bar = progress_bar(total=plan.steps, initial=step, desc="train", unit="step",
                       disable=not (progress and world.is_main))
    batches = iter(loader)
    window = {"t0": time.perf_counter(), "steps": 0, "data": 0.0, "nonfinite_in_a_row": 0}
    counters = DeviceCounters() if cfg.train.sync_every > 1 else None
    dedupe = cfg.train.dedupe_captions and cfg.train.accum_steps == 1 and text_draws_no_randomness(engine.module)
    preempted = False
    timer = StepTimer(cfg.train, first_step=step) if cfg.train.fit_steps_to_time else None
    overhead_s = 0.0  # budget seconds spent in checkpoints and evaluations: not step time
    while step < plan.steps:
        t0 = time.perf_counter()
        images, texts = next(batches)
        keys_B = positive_keys(loss_fn, texts, loader.last_classes)  # from the CPU tokens: no device sync
        texts, text_rows_B = distinct_captions(texts) if dedupe else (texts, None)
        batch = (loader.to_device(images, device, dtype), *(t if t is None else to_device(t, device)
                                                             for t in (texts, keys_B, text_rows_B)))
        window["data"] += time.perf_counter() - t0
        out_of_time = bool(cfg.train.max_time_s) and elapsed_s() >= cfg.train.max_time_s
        out = train_step(engine, batch, loss_fn=loss_fn, max_logit_scale=cfg.model.max_logit_scale,
                         accum_steps=cfg.train.accum_steps, stop=stop.requested or out_of_time,
                         skip_on_device=counters is not None)
        if counters is not None:  # train.sync_every > 1: the host reads the device's results now and then
            counters.add(out)
            if host_reads_at(step + 1, cfg, total_steps=plan.steps):
                out, nonfinite, window["nonfinite_in_a_row"] = counters.read(out)
                nonfinite_total += nonfinite
            else:
                out = None
        elif out.get("loss_scale_skip"):  # fp16 overflow: DeepSpeed lowered the loss scale and skipped the step
            loss_scale_skips += 1
        elif not out["updated"]:
            nonfinite_total += 1
            window["nonfinite_in_a_row"] += 1
        else:
            window["nonfinite_in_a_row"] = 0
        if window["nonfinite_in_a_row"] >= cfg.train.max_nonfinite_in_a_row:
            raise TrainingDiverged(f"training diverged: {window['nonfinite_in_a_row']} non-finite losses in a row "
                                   f"at step {step + 1}; the last good checkpoint is kept in {run_dir / 'checkpoints'} "
                                   f"(lower optim.lr or check the data)")
        if out is not None and not out["updated"]:
            continue
        step += 1
        window["steps"] += 1
        bar.update(1)
        if out is None:  # sync_every > 1 and nothing read on the host at this step
            continue
        # Here the host has waited for the device (it read the step's results): the budget's clock is honest.
        step_time_s = None if timer is None else timer.observe(step, elapsed_s=elapsed_s(), overhead_s=overhead_s)
        if step_time_s is not None:
            _fit_plan(plan, step=step, step_time_s=step_time_s, elapsed=elapsed_s(), cfg=cfg, world=world,
                      logger=logger, run_dir=run_dir, bar=bar, announce=progress and world.is_main)
        if step % cfg.train.log_every == 0 or step == plan.steps or out["stop"]:
            record = _log_record(step, out, cfg, scheduler, loader, window, world, time_s=elapsed_s(),
                                 nonfinite=nonfinite_total, loss_scale_skips=loss_scale_skips)
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        overhead_from = budget_clock()
        if step % cfg.train.checkpoint_every == 0 or step == plan.steps or out["stop"]:
            save(step)
        if out["stop"]:
            preempted = step < plan.steps
            break
        if evaluators and ((cfg.eval.every and step % cfg.eval.every == 0) or step == plan.steps):
            # Under amp_bf16 the evaluation's forwards get the training forward's autocast (DeepSpeed's engine
            # applies it to training forwards only; evaluators call the module).
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision == "amp_bf16"):
                results = run_evaluators(evaluators, bundle, batch_size=cfg.eval.batch_size)
            engine.module.train()
            logger.log({"step": step, "time_s": elapsed_s(), **results})
            record = {**record, **results}
        overhead_s += budget_clock() - overhead_from
    bar.close()
    stop.restore()
    logger.close()
    return TrainResult(record=record, step=step, preempted=preempted)


def _fit_plan(plan: StepPlan, *, step: int, step_time_s: float, elapsed: float, cfg: Config, world, logger, run_dir,
              bar, announce: bool) -> None:
    """train.fit_steps_to_time: rank 0 plans the total steps from its measured step time and every rank adopts
    that plan (again at later windows where step_plan.worth_refitting says so) (the ranks' clocks differ a little, and all must stop at the same step); recorded in metrics.jsonl
    and RUN/step_plan.json. A collective: every rank calls it at the same step."""
    planned = fit_steps(step=step, elapsed_s=elapsed, step_time_s=step_time_s, cfg=cfg.train)
    planned, step_time_s = host_broadcast_object((planned, step_time_s) if world.is_main else None)
    if not worth_refitting(plan, planned=planned, step_time_s=step_time_s, cfg=cfg.train):
        return
    plan.fit(steps=planned, at_step=step, step_time_s=step_time_s, warmup_steps=cfg.optim.warmup_steps)
    record = {"step": step, "planned_steps": planned, "fit": plan.fits, "step_time_s": step_time_s, "time_s": elapsed,
              "max_time_s": cfg.train.max_time_s, "fit_reserve_s": reserve_s(cfg.train)}
    logger.log(record)
    if world.is_main:
        checkpoint.atomic_write_text(run_dir / "step_plan.json", json.dumps({**plan.to_json(), **record}, indent=2))
    bar.total = planned
    bar.refresh()
    if announce:
        bar.write(f"train.fit_steps_to_time: {step_time_s:.3f} s per step -> {planned} steps (train.steps "
                  f"{cfg.train.steps}) to end within train.max_time_s={cfg.train.max_time_s:g}")


def _log_record(step, out, cfg, scheduler, loader, window, world, *, time_s, nonfinite, loss_scale_skips) -> dict:
    """One metrics.jsonl record for the window of steps since the last one (resets the window)."""
    seconds = time.perf_counter() - window["t0"]
    # A host tensor: on a CUDA world it goes over the process group's gloo side (NCCL refuses host tensors).
    per_rank = host_all_gather(torch.tensor([window["steps"] * cfg.train.batch_size / world.world_size / seconds]))
    steps = max(1, window["steps"])
    record = {"step": step, "loss": out["loss"], "lr": scheduler.get_last_lr()[0],
              "logit_scale": out["logit_scale"].item(),
              "samples_per_s": window["steps"] * cfg.train.batch_size / seconds,
              "samples_per_s_per_rank": [round(v, 2) for v in per_rank.tolist()],
              "data_wait_s": window["data"] / steps, "compute_s": (seconds - window["data"]) / steps,
              "samples_seen": step * cfg.train.batch_size, "skipped_samples": loader.num_skipped,
              "nonfinite_skips": nonfinite, "time_s": time_s,
              **({"loss_scale_skips": loss_scale_skips} if cfg.deepspeed.precision == "fp16" else {})}
    window.update(t0=time.perf_counter(), steps=0, data=0.0)
    return record
