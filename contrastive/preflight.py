"""What a run reads, checked before any process group or DeepSpeed import: `contrastive train` and `contrastive
slurm submit` call check_run_inputs, so a typo costs seconds at the prompt, not a queue wait or DeepSpeed's
start-up (on a machine without its CPU communication op built, ~90 s of compiling)."""
from __future__ import annotations

from contrastive.config import Config
from contrastive.errors import UserError


def check_run_inputs(cfg: Config) -> list:
    """Raise a one-line UserError if cfg's training shards, model name, pretrained tower files or evaluator data
    are missing; returns the built evaluators (building one checks its data). Imports open_clip (and torch),
    never DeepSpeed; relative paths are read from the current directory, as the run will."""
    from contrastive.evaluators import build_evaluators
    from contrastive.models import get_open_clip_config
    from contrastive.pretrained import hf_text_dirs, local_path
    from contrastive.sharding import expand_sources

    expand_sources(cfg.data.train)
    get_open_clip_config(cfg.model.name)  # the lookup build_model makes
    if cfg.model.text_pretrained:
        hf_text_dirs(cfg.model.text_pretrained, cfg.model.text_tokenizer)
    if cfg.model.image_pretrained and not local_path(cfg.model.image_pretrained,
                                                     what="model.image_pretrained").is_file():
        raise UserError(f"model.image_pretrained {cfg.model.image_pretrained!r} is not a file (give a timm "
                        f".safetensors or a weights-only .pth/.bin state dict)")
    return build_evaluators(cfg.eval)
