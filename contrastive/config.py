"""Typed run configuration: nested dataclasses, YAML files and strict `dotted.key=value` overrides."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from contrastive.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override a user wrote is wrong."""


# Every collective of a run must finish within this (train.dist_timeout_s): long enough for a checkpoint of a
# large model or an in-loop evaluation on rank 0's side, short enough that a dead peer ends the job.
DEFAULT_DIST_TIMEOUT_S = 1800.0


CAPTION_SAMPLING = ("first", "random")
LOG_TO = ("tensorboard", "wandb")


@dataclass
class DataConfig:
    # Shard specs: brace expansion allowed, several sources joined with '::'; a folder stands for the .tar shards
    # in it (img2dataset's output folder).
    train: str = ""
    # Validation shards: recorded in the resolved config and an export's model card; training reads none
    # (each evaluator names its own data).
    val: str = ""
    # Share of training samples drawn from each '::' source of `train` (resampled mode only), normalised;
    # empty: sources in proportion to their sizes (every sample equally likely).
    train_weights: list[float] = field(default_factory=list)
    # Resampled: infinite stream drawn with replacement. False: epoch-exact, every sample once per epoch.
    resampled: bool = True
    # DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = 2
    # Samples held in the shuffle buffer that mixes samples within a block of whole shards.
    shuffle_buffer: int = 1000
    # Sample keys (file extensions in a shard) tried in turn for the image, ';'-separated.
    image_key: str = "jpg;jpeg;png;webp"
    # Sample key of the caption.
    caption_key: str = "txt"
    # Per-rank prefetch factor for the DataLoader (batches per worker kept ready).
    prefetch_factor: int = 4
    # Each stream reads blocks of whole shard ranges of at least this many samples; the shuffle buffer mixes
    # within a block, the unit a resume starts in. 0: 10 x shuffle_buffer, >= 1000.
    block_samples: int = 0
    # Run the model's open_clip train transform on uint8 pixels (same random crop, resampled within a grey
    # level of PIL) and decode JPEGs at reduced size where the crop still covers the output (see
    # contrastive/transforms.py); false runs the transform on PIL images exactly as built.
    fast_decode: bool = True
    # Batches of uint8 RGBX pixels (channels-last), normalised by the training step on its device (bit for
    # bit the float batch): a third of the bytes to write and ship, and no normalise pass in the workers. Needs
    # fast_decode and an open_clip train transform. None (default): on when training on a GPU, where the
    # normalise is free; on CPU it would move that pass into the training process.
    uint8_batches: Optional[bool] = None
    # Decode, crop and resample JPEGs on the training device (DALI-style): the workers only read the bytes
    # and draw each sample's crop and flip (the same draws as on the CPU path), and the training process
    # decodes the whole batch in one torchvision decode_jpeg call (nvJPEG on CUDA), then crops, resamples
    # (antialiased, as open_clip), flips and normalises there. Other images (PNG, WebP, CMYK, cut-off files)
    # are still decoded in the workers; uint8_batches does not apply. Off by default: the pixels differ from
    # the CPU path's (another decoder on CUDA, float resampling) and it pays only on a GPU, where the
    # workers' decode and resample are the bottleneck; measured by bench/gpu_check.py.
    decode_on_device: bool = False
    # The caption a sample with several (its JSON's "captions", as `prep pairs` groups a table's rows per image)
    # trains with. first: its .txt (the first caption) at every visit. random: one of its captions drawn
    # uniformly at each visit from the sample's per-visit seed (seed, epoch, rank, worker, block, index), so a
    # run is reproducible and a resume draws what the uninterrupted run would. Samples without a captions
    # list use their .txt either way.
    caption_sampling: str = "first"
    # Captions per sample per visit (K): a sample with several captions trains with K of them at once, drawn
    # without replacement as data.caption_sampling says (random: a seeded shuffle of its captions; first: its
    # captions in file order), repeated in turn when it has fewer than K. The loss is then the mean over k of
    # the loss between the B images and the B k-th captions (losses.mean_over_captions): each image meets K
    # views of its text at the price of one image forward. 1: one caption, as every CLIP trainer.
    captions_per_sample: int = 1

    def __post_init__(self):
        if self.captions_per_sample < 1:
            raise ConfigError(f"data.captions_per_sample must be >= 1, got {self.captions_per_sample}")
        if self.caption_sampling not in CAPTION_SAMPLING:
            raise ConfigError(f"data.caption_sampling must be one of {', '.join(CAPTION_SAMPLING)}; "
                              f"got {self.caption_sampling!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if any(w < 0 for w in self.train_weights):
            raise ConfigError(f"data.train_weights must be non-negative, got {self.train_weights}")
        if self.train_weights and not any(self.train_weights):
            raise ConfigError("data.train_weights are all zero: give at least one source a positive weight")
        if self.block_samples < 0:
            raise ConfigError(f"data.block_samples must be >= 0, got {self.block_samples}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.decode_on_device and not self.fast_decode:
            raise ConfigError("data.decode_on_device=true needs data.fast_decode=true (the device path draws the "
                              "fast transform's crops)")
        if self.uint8_batches and not self.fast_decode:
            raise ConfigError("data.uint8_batches=true needs data.fast_decode=true (the plain transform "
                              "normalises in PIL's pipeline)")


@dataclass
class ModelConfig:
    # An open_clip model config name (built-in, or one of ours under configs/models/).
    name: str = "tiny-vit-32"
    # QuickGELU activations whatever model.name's config says (as open_clip's --force-quick-gelu; OpenAI's weights).
    force_quick_gelu: bool = False
    # FLIP patch dropout during training (fraction of patches dropped); None keeps the config's value.
    patch_dropout: Optional[float] = None
    # Train-time augmentation passed to open_clip's transforms (e.g. {scale: [0.8, 1.0]}).
    aug: dict[str, Any] = field(default_factory=dict)
    # Upper bound on the learnable logit scale, as exp(): CLIP clamps at 100.
    max_logit_scale: float = 100.0
    # Initial learnable logit bias (SigLIP uses -10); None builds a model without one.
    init_logit_bias: Optional[float] = None
    # Initial logit scale, as log() like open_clip's init_logit_scale; None keeps CLIP's log(1/0.07) = 2.659.
    # SigLIP starts at log(10) = 2.303.
    init_logit_scale: Optional[float] = None
    # Activation checkpointing of the transformer blocks (recompute in backward to save memory).
    grad_checkpointing: bool = False
    # torch.compile the image and text towers (in place: checkpoint keys do not change). The first steps pay
    # the compilation; compile_backend "eager" or "aot_eager" checks the tracing without generating code.
    compile: bool = False
    # torch.compile backend of model.compile.
    compile_backend: str = "inductor"
    # Pretrained towers, from local files only (see contrastive/pretrained.py). text_pretrained: a Hugging Face
    # (or sentence-transformers) model directory that replaces model.name's text tower, through open_clip's
    # HF adapter; "pkg:module/sub" names a directory inside an installed Python package.
    text_pretrained: str = ""
    # The tokenizer's directory, if not text_pretrained's.
    text_tokenizer: str = ""
    # Pooling of the HF tower's tokens: cls (first token), mean (over non-pad tokens), pooler (the model's own
    # pooler layer), auto (a sentence-transformers directory's pooling, else open_clip's default for the family).
    text_pooler: str = "auto"
    # Projection to embed_dim after pooling: linear, mlp, or none (needs the text width to equal embed_dim).
    text_proj: str = "linear"
    # Tokens per caption (0: model.name's text context length), at most the model's max_position_embeddings.
    text_context_length: int = 0
    # Build text_pretrained's architecture and tokenizer with random weights (the baseline of a pretrained run).
    text_random_init: bool = False
    # A timm checkpoint (.safetensors or a weights-only state dict) for model.name's timm image tower.
    image_pretrained: str = ""
    # Both towers and the logit scale from one trained CLIP, for fine-tuning: an open_clip checkpoint file
    # (open_clip_train's epoch_N.pt, a .bin/.pth/.safetensors state dict), an open_clip `local-dir:` folder
    # (`contrastive export --format open_clip` writes one), or one of our run or checkpoint directories. The
    # architecture is still model.name's (with text_pretrained's text tower, if set); the weights must fit it.
    pretrained: str = ""
    # Locked towers (LiT), as open_clip's --lock-image / --lock-text; optim.freeze adds regexes on top.
    lock_image: bool = False
    # Leave the last N layer groups of the image tower trainable.
    lock_image_unlocked_groups: int = 0
    # Also freeze BatchNorm running statistics (they stay fixed in train mode).
    lock_image_freeze_bn_stats: bool = False
    # Lock the text tower (open_clip's --lock-text).
    lock_text: bool = False
    # Leave the last N layers of the text tower trainable.
    lock_text_unlocked_layers: int = 0
    # Also freeze LayerNorm parameters of the locked layers (LayerNorm keeps no running statistics).
    lock_text_freeze_layer_norm: bool = False
    # Keep up to this many captions' pooled features of a fully locked HF text tower in memory, computed once
    # without dropout (LiT's precomputed features of a locked tower); pays off when captions repeat, as class
    # templates do. 0: off. Not under ZeRO-3, whose ranks must gather the tower's weights together.
    lock_text_cache_size: int = 0

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name must name an open_clip model config, e.g. tiny-vit-32 or ViT-B-32")
        if self.patch_dropout is not None and not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"model.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        choices = {"text_pooler": ("auto", "cls", "mean", "pooler"), "text_proj": ("linear", "mlp", "none")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"model.{key} must be one of {', '.join(valid)}; got {getattr(self, key)!r}")
        if not self.text_pretrained:
            changed = [k for k, default in (("text_tokenizer", ""), ("text_pooler", "auto"), ("text_proj", "linear"),
                                            ("text_random_init", False)) if getattr(self, k) != default]
            if changed:
                raise ConfigError(f"model.{changed[0]} applies to a pretrained text tower: set model.text_pretrained")
        for key, lock in (("lock_image_unlocked_groups", "lock_image"), ("lock_text_unlocked_layers", "lock_text")):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
            if getattr(self, key) and not getattr(self, lock):
                raise ConfigError(f"model.{key} has no effect without model.{lock}=true")
        for key, lock in (("lock_image_freeze_bn_stats", "lock_image"), ("lock_text_freeze_layer_norm", "lock_text")):
            if getattr(self, key) and not getattr(self, lock):
                raise ConfigError(f"model.{key} has no effect without model.{lock}=true")
        if self.pretrained and self.image_pretrained:
            raise ConfigError("model.pretrained already sets the image tower's weights; drop model.image_pretrained")
        if self.pretrained and self.text_random_init:
            raise ConfigError("model.pretrained sets the text tower's weights; drop model.text_random_init")
        if self.text_context_length < 0:
            raise ConfigError(f"model.text_context_length must be >= 0, got {self.text_context_length}")
        if self.lock_text_cache_size < 0:
            raise ConfigError(f"model.lock_text_cache_size must be >= 0, got {self.lock_text_cache_size}")
        if self.lock_text_cache_size and not (self.text_pretrained and self.lock_text and self.lock_text_freeze_layer_norm
                                              and not self.lock_text_unlocked_layers):
            raise ConfigError("model.lock_text_cache_size needs a fully locked pretrained text tower: model.text_pretrained, "
                              "lock_text=true, lock_text_freeze_layer_norm=true, lock_text_unlocked_layers=0")


@dataclass
class LossConfig:
    # infonce: CLIP's softmax loss with all-gathered negatives (holds a local x global logits matrix).
    # infonce_tiled: the same loss and gradients, computed tile by tile (memory linear in the global batch).
    # siglip: sigmoid loss over all pairs; needs model.init_logit_bias (SigLIP uses -10).
    name: str = "infonce"
    # InfoNCE losses only: the weight spread uniformly over all targets, as in torch's cross_entropy.
    label_smoothing: float = 0.0
    # infonce_tiled: rows and columns of one tile of logits; memory per tile is tile_size**2 floats.
    tile_size: int = 2048
    # Which pairs of a global batch count as positives of each other (infonce only for caption and class):
    # "pair" (CLIP as published: only an image and its own caption; every other column is a negative, even the
    # same string), "caption" (also every column whose caption is identical: captions drawn from a few templates
    # repeat), or "class" (also every column of the same class: samples with a .cls label in shards that have a
    # classnames.txt, as `contrastive prep imagefolder` writes them; other samples fall back to "caption").
    positives: str = "pair"

    def __post_init__(self):
        valid = ("infonce", "infonce_tiled", "siglip")
        if self.positives not in ("pair", "caption", "class"):
            raise ConfigError(f"loss.positives must be pair, caption or class; got {self.positives!r}")
        if self.positives != "pair" and self.name != "infonce":
            raise ConfigError(f"loss.positives={self.positives} works with loss.name=infonce, not {self.name}")
        if self.name not in valid:
            raise ConfigError(f"loss.name must be one of {', '.join(valid)}; got {self.name!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.name == "siglip":
            raise ConfigError("loss.label_smoothing applies to infonce and infonce_tiled, not siglip "
                              "(each sigmoid pair has its own binary label); set it to 0")
        if self.tile_size <= 0:
            raise ConfigError(f"loss.tile_size must be > 0, got {self.tile_size}")


@dataclass
class OptimConfig:
    # Peak learning rate of AdamW, reached after warmup_steps, then a cosine schedule.
    lr: float = 5e-4
    # AdamW weight decay; none on gains, biases, embeddings and the logit scale.
    weight_decay: float = 0.2
    # AdamW's first-moment decay.
    beta1: float = 0.9
    # AdamW's second-moment decay.
    beta2: float = 0.98
    # AdamW's epsilon.
    eps: float = 1e-6
    # Steps of linear warmup from 0 to lr.
    warmup_steps: int = 100
    # The cosine schedule decays to lr * min_lr_ratio at train.steps.
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value; 0: no clipping.
    grad_clip: float = 1.0
    # Regexes on parameter names; matching parameters are frozen (no gradient, no optimizer state), e.g.
    # ["^visual\\."] locks the image tower (LiT).
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self):
        import re

        for pattern in self.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"optim.freeze pattern {pattern!r} is not a valid regex: {e}") from None
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    # Optimizer steps of the run (the cosine schedule's length; an upper bound under fit_steps_to_time).
    steps: int = 1000
    # Global batch: summed over all ranks.
    batch_size: int = 256
    # Save a checkpoint every this many steps (and at the end, and on preemption).
    checkpoint_every: int = 500
    # Checkpoints kept on disk; older ones are pruned.
    keep_checkpoints: int = 2
    # "", "latest", or a path to a checkpoint directory.
    resume: str = ""
    # Seed of everything random (weights, data order, augmentation), per rank; a resume needs the same seed.
    seed: int = 0
    # Write a metrics.jsonl record (and TensorBoard/wandb scalars) every this many steps.
    log_every: int = 10
    # Split each step's global batch into this many micro-batches per rank; negatives still span the whole
    # global batch (features are cached without grad, then recomputed per micro-batch, as in GradCache).
    accum_steps: int = 1
    # Stop (with a checkpoint) once this much wall-clock time has passed; 0 means no limit.
    max_time_s: float = 0.0
    # Plan the run's total steps from its own step time, so that the cosine schedule ends by max_time_s on any
    # machine (contrastive/step_plan.py): after fit_skip_steps steps (worker start-up, compilation), the
    # seconds per step over the next fit_measure_steps, on the clock max_time_s counts and at steps where the
    # host has waited for the device, give planned steps = steps done + (max_time_s - elapsed - fit_reserve_s)
    # / step time. train.steps stays an upper bound: a faster machine trains the schedule the recipe was tuned
    # on (same result, sooner) instead of a longer one nobody tuned; set train.steps high to fill the budget
    # instead. Rank 0's plan is broadcast, saved in checkpoints (a resume keeps it, and with it the lr of every
    # step) and logged (a `planned_steps` record in metrics.jsonl, RUN/step_plan.json). A fit after
    # optim.warmup_steps bends the cosine from where it stands, so the lr never jumps; measured within the
    # warmup it is the plain cosine over the planned steps.
    fit_steps_to_time: bool = False
    # fit_steps_to_time: steps of start-up not timed.
    fit_skip_steps: int = 10
    # fit_steps_to_time: steps timed to plan from.
    fit_measure_steps: int = 40
    # Measure every later window of fit_measure_steps steps too and fit the plan again where one moves the planned
    # end by more than fit_reserve_s / 2 (contrastive/step_plan.py): steps that speed up once a locked tower's
    # cache is full, or slow down on a busier machine. false: plan once.
    fit_refit: bool = True
    # Seconds of max_time_s the plan leaves to in-loop evaluations, checkpoints and the final save (they are not
    # in the measured step time). None: 5% of max_time_s.
    fit_reserve_s: Optional[float] = None
    # Non-finite losses skip their update; this many in a row stop the run.
    max_nonfinite_in_a_row: int = 5
    # Read the loss and the stop/non-finite flags on the host every this many steps (and at log, checkpoint
    # and eval steps) instead of every step, so the host never waits for the device in between. With N > 1
    # a non-finite step's update is skipped on the device (fused AdamW's found_inf) and counts as a step, and a
    # stop request (preemption, max_time_s) takes effect at the next read. 0 (auto): on a GPU, where DeepSpeed
    # steps our optimizer itself (zero_stage 0, precision fp32 or amp_bf16), read only where the loop logs,
    # checkpoints or evaluates; else every step.
    sync_every: int = 0
    # Encode each distinct caption of a batch once (templated captions repeat): the same features and
    # gradients as encoding every copy. Applies when the text tower has no dropout and accum_steps is 1.
    dedupe_captions: bool = True
    # Timeout of every collective of the process group, in seconds (torch's default is 10 or 30 minutes
    # depending on the backend): a rank that died or hangs ends the job with an error instead of a silent hang.
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    # Where metrics.jsonl's records are mirrored as well: tensorboard (RUN/tensorboard) and wandb (Weights & Biases,
    # `pip install wandb`; its project train.wandb_project, its run named as the run directory; WANDB_MODE,
    # WANDB_ENTITY and WANDB_DIR from the environment). A resumed run continues its wandb run (RUN/wandb_run.json).
    log_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Weights & Biases project when log_to names wandb.
    wandb_project: str = "contrastive"

    def __post_init__(self):
        unknown = [sink for sink in self.log_to if sink not in LOG_TO]
        if unknown:
            raise ConfigError(f"train.log_to: {unknown[0]!r} is not one of {', '.join(LOG_TO)}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints", "accum_steps",
                     "max_nonfinite_in_a_row"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.sync_every < 0:
            raise ConfigError(f"train.sync_every must be >= 0 (0: auto), got {self.sync_every}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"train.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by train.accum_steps={self.accum_steps}")
        if self.fit_steps_to_time and self.max_time_s <= 0:
            raise ConfigError("train.fit_steps_to_time=true plans the steps that fit in train.max_time_s: set "
                              "train.max_time_s > 0 (seconds), or fit_steps_to_time=false")
        if self.fit_skip_steps < 0 or self.fit_measure_steps <= 0:
            raise ConfigError(f"train.fit_skip_steps must be >= 0 and train.fit_measure_steps > 0, got "
                              f"{self.fit_skip_steps} and {self.fit_measure_steps}")
        reserve = self.fit_reserve_s
        if self.fit_steps_to_time and reserve is not None and not 0 <= reserve < self.max_time_s:
            raise ConfigError(f"train.fit_reserve_s must be in [0, train.max_time_s={self.max_time_s}), "
                              f"got {reserve}")


@dataclass
class EvaluatorConfig:
    # Plug-in name, see eval.registry (e.g. "zeroshot").
    name: str = "zeroshot"
    # The evaluator's data (zeroshot: an ImageFolder, shards or a CLIP_benchmark folder; retrieval: a captioned set).
    data: str = ""
    # Label from this JSON field of each sample (e.g. "shape"); empty reads `.cls`.
    label_field: str = ""
    # zeroshot: class names (empty: the data's own, e.g. a CLIP_benchmark folder's classnames.txt).
    classes: list[str] = field(default_factory=list)
    # zeroshot: prompt templates with {c} (empty: the data's own, else the built-in default).
    templates: list[str] = field(default_factory=list)
    # Result key in metrics (defaults to name/label_field).
    tag: str = ""
    # Evaluate on at most this many samples (0: all).
    max_samples: int = 0


@dataclass
class EvalConfig:
    # Run the evaluators every N steps (0: only at the end of training).
    every: int = 0
    # Images (and captions) per encoder batch in evaluation, per rank.
    batch_size: int = 256
    # The plug-ins to run, each {name: zeroshot | retrieval, data: ..., ...}.
    evaluators: list[EvaluatorConfig] = field(default_factory=list)


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "amp_bf16")


@dataclass
class DeepSpeedConfig:
    """Maps onto a DeepSpeed config; the batch sizes, optimizer and clipping come from train/optim."""

    # DeepSpeed ZeRO stage 0-3 (1: optimizer state, 2: + gradients, 3: + weights partitioned over ranks).
    zero_stage: int = 0
    # fp32; bf16/fp16: DeepSpeed's half-precision weights and optimizer wrappers, with fp32 master weights and
    # gradients reduced across ranks in fp32 (bf16 also accumulates micro-steps in fp32: DeepSpeed's
    # BF16_Optimizer, which it builds for ZeRO stage 1, so bf16 with zero_stage 0 runs as stage 1); amp_bf16:
    # fp32 weights and optimizer with bf16 autocast (DeepSpeed's torch_autocast; open_clip's amp_bf16).
    # auto: amp_bf16 on a GPU, fp32 on a CPU.
    precision: str = "auto"
    # Further DeepSpeed config keys, deep-merged over the derived config (e.g. {zero_optimization: {overlap_comm: true}}).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"deepspeed.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self):
        if self.data.captions_per_sample > 1 and self.loss.positives != "pair":
            raise ConfigError(f"data.captions_per_sample={self.data.captions_per_sample} works with loss.positives=pair, "
                              f"not {self.loss.positives} (each of the K captions is its image's only positive)")


def resolve_auto(cfg: Config, *, cuda: bool) -> Config:
    """The config a run trains with: every `auto` value chosen for the device (the run directory records it).
    Refuses combinations that would train silently worse: bf16 gradient accumulation under ZeRO 2/3, which
    DeepSpeed can only do in bf16."""
    precision = cfg.deepspeed.precision
    if precision == "auto":
        precision = "amp_bf16" if cuda else "fp32"
    sync_every = cfg.train.sync_every
    if not sync_every:
        plain = cfg.deepspeed.zero_stage == 0 and precision in ("fp32", "amp_bf16")
        sync_every = cfg.train.log_every if cuda and plain else 1
    if precision == "bf16" and cfg.deepspeed.zero_stage >= 2 and cfg.train.accum_steps > 1:
        raise ConfigError(f"deepspeed.precision=bf16 with zero_stage={cfg.deepspeed.zero_stage} would accumulate "
                          f"train.accum_steps={cfg.train.accum_steps} micro-steps in bf16 (DeepSpeed keeps ZeRO 2/3 "
                          f"gradients in the weights' dtype): use zero_stage 0 or 1, or precision amp_bf16")
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, precision=precision),
                               train=dataclasses.replace(cfg.train, sync_every=sync_every))


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return merge(tp(), value, prefix=key)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def merge(base: Any, updates: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass `base` with `updates` applied; unknown keys raise ConfigError."""
    hints = typing.get_type_hints(type(base))
    names = [f.name for f in dataclasses.fields(base)]
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys{' under ' + prefix if prefix else ''}: {', '.join(names)}")
        tp = hints[key]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            changes[key] = merge(getattr(base, key), value, prefix=full)
        else:
            changes[key] = _coerce(value, tp, full)
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _override_type(schema: Any, parts: list[str]) -> Any:
    """The annotation of the field a dotted override key names in dataclass `schema`; Any past a dict or list
    field (their entries are free-form), None for an unknown key (merge reports it with the valid ones)."""
    tp = schema
    for part in parts:
        if not _is_dataclass_type(tp):
            return Any
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def parse_overrides(overrides: list[str], schema: Any = None) -> dict:
    """Turn ['a.b=1', 'c=x'] into {'a': {'b': 1}, 'c': 'x'}. A value is the raw text where `schema` (a config
    dataclass) types the key as a string, so that data.train={00000..00009}.tar and model.name=no mean what
    they say; other values (and every value without a schema) are parsed as YAML."""
    tree: dict = {}
    previous = None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        parts = key.split(".")
        tp = _override_type(schema, parts) if schema is not None else Any
        if (previous is not None and previous[0] == key and previous[1] != raw and _is_text(tp)
                and re.sub(r"\d+", "#", previous[1]) == re.sub(r"\d+", "#", raw)):
            # Unquoted, `data.train=d/{00000..00009}.tar` reaches us as ten adjacent overrides of one key that
            # differ only in their numbers (the shell expands braces): only the last would count, training on
            # one shard. Other repeats keep "the later wins".
            raise ConfigError(f"{key} is given twice in a row ({previous[1]!r}, then {raw!r}): did the shell expand "
                              f"braces? Quote the override, e.g. '{key}=data/{{00000..00009}}.tar'")
        previous = (key, raw)
        if raw == "" or (_is_text(tp) and not (tp is not str and raw in ("null", "~"))):
            value = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                if raw.lstrip().startswith(("[", "{")):
                    raise ConfigError(f"override {item!r}: the value is not valid YAML "
                                      f"({str(e).splitlines()[0]})") from None
                value = raw
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return tree


def _yaml_error_line(path: Path, e: yaml.YAMLError) -> str:
    """A YAML error as one line that names the file, line and column (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    return f"config file {where}: not valid YAML: {what or str(e).splitlines()[0]}"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_line(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=Config) -> Any:
    """Defaults <- YAML file <- overrides, merged strictly."""
    cfg = cls()
    if path is not None:
        cfg = merge(cfg, load_yaml(path))
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides, schema=cls))
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so a run records exactly what it ran."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
