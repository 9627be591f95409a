"""The training step and the loop that schedules logging, checkpoints and evaluation around it."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml

from contrastive import checkpoint
from contrastive.config import Config, OptimConfig, save_config, to_dict
from contrastive.data import TrainLoader
from contrastive.distributed import WorldInfo, all_reduce_mean
from contrastive.evaluators import build_evaluators, run_evaluators
from contrastive.losses import build_loss
from contrastive.metrics import MetricsLogger
from contrastive.models import build_model, clamp_logit_scale, param_groups


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at `total_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_step(model, batch, *, loss_fn, optimizer, scheduler, grad_clip: float, max_logit_scale: float,
               group=None) -> dict:
    """Forward, loss over the global batch, backward, update. Returns scalar tensors (read lazily)."""
    images, texts = batch
    out = model(images, texts)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"), group=group)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    clamp_logit_scale(model, max_logit_scale)
    return {"loss": loss.detach(), "logit_scale": out["logit_scale"].detach().reshape(())}


def train(cfg: Config, run_dir: Path, *, world: WorldInfo | None = None, progress: bool = True) -> dict:
    """Train per `cfg` into `run_dir`; returns the final metrics record (with eval results)."""
    from tqdm import tqdm

    world = world or WorldInfo()
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_config(cfg, run_dir / checkpoint.CONFIG_FILE)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.batch_size % world.world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world.world_size} ranks")
    batch_per_rank = cfg.train.batch_size // world.world_size

    bundle = build_model(cfg.model)
    model = bundle.model.train()
    loader = TrainLoader(cfg.data, preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer,
                         batch_size_per_rank=batch_per_rank, seed=cfg.train.seed, world=world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    loss_fn = build_loss(cfg.loss)
    evaluators = build_evaluators(cfg.eval)
    logger = MetricsLogger(run_dir, enabled=world.is_main)

    step = 0
    resume_from = checkpoint.resolve_checkpoint(run_dir, cfg.train.resume)
    if resume_from is not None:
        state = checkpoint.load_training_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        step = state["step"]
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        logger.truncate_after(step)

    def save(at_step: int) -> None:
        checkpoint.save_training_checkpoint(
            run_dir, step=at_step, model=model, optimizer=optimizer, scheduler=scheduler,
            state={"loader": loader.state_dict(), "torch_rng": torch.get_rng_state().tolist()},
            config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False),
            model_cfg=bundle.model_cfg, preprocess_cfg=bundle.preprocess_cfg, keep=cfg.train.keep_checkpoints)

    record: dict = {}
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", disable=not (progress and world.is_main))
    batches = iter(loader)
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        out = train_step(model, batch, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                         grad_clip=cfg.optim.grad_clip, max_logit_scale=cfg.model.max_logit_scale)
        step += 1
        window_samples += cfg.train.batch_size
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "loss": all_reduce_mean(out["loss"]).item(),
                      "lr": scheduler.get_last_lr()[0], "logit_scale": out["logit_scale"].item(),
                      "samples_per_s": window_samples / elapsed, "data_wait_s": data_wait,
                      "samples_seen": step * cfg.train.batch_size, "skipped_samples": loader.num_skipped}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            save(step)
        if evaluators and ((cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps):
            results = run_evaluators(evaluators, bundle, batch_size=cfg.eval.batch_size)
            model.train()
            logger.log({"step": step, **results})
            record = {**record, **results}
    bar.close()
    logger.close()
    return record
