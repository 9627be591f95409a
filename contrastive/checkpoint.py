"""Checkpoints in the run directory: DeepSpeed state plus ours, published atomically, pruned, found by `latest`.

Layout: RUN/checkpoints/step_XXXXXXXX/ holds DeepSpeed's files for that tag (module and ZeRO-partitioned
optimizer states), `state.json` (step, time, counters; rank 0), `rank_NNNNN.json` (each rank's data position
and RNG state), `model.json` (open_clip architecture + preprocess config) and `config.yaml` (the resolved run
config), and last `complete.json` (every file with its size: the completeness marker). It is written under
checkpoints/.incoming/, fsynced, and renamed into place only when complete (a re-saved tag's old directory is
renamed aside to checkpoints/.replaced/ first and deleted only after), and RUN/checkpoints/latest is replaced
atomically afterwards, so a run killed at any moment leaves the previous checkpoint intact. A `latest` that
names a missing or incomplete checkpoint falls back to the newest complete one before it. Nothing is unpickled on load beyond tensors and allow-listed DeepSpeed classes.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from contrastive.errors import UserError
from contrastive.faults import fault_point

CKPT_DIR = "checkpoints"
INCOMING = ".incoming"
LATEST = "latest"
MODEL_FILE = "model.safetensors"  # full weights (exports and consolidated checkpoints)
ARCH_FILE = "model.json"  # open_clip architecture + preprocess config of the weights beside it
STATE_FILE = "state.json"  # step and other plain-JSON training state shared by all ranks
CONFIG_FILE = "config.yaml"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2; ZeRO-3 shards it per rank
MANIFEST = "complete.json"  # written last, before publishing: its presence marks a complete checkpoint
REPLACED = ".replaced"  # a re-saved tag's previous directory waits here until the new one is in place
_STEP_DIR = re.compile(r"step_(\d+)")
# Failures of the filesystem a user can fix (full disk, quota, read-only or forbidden directory).
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def _say(message: str) -> None:
    """One line on stderr from the first rank only (this runs before any process group exists: RANK says which)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"contrastive: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- durability

def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the renames in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`. Every rank calls it on the staged checkpoint: on a shared
    filesystem only the node that wrote a file can flush it, and fsync of a file another node wrote is cheap."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                _fsync(Path(dirpath) / name)
            except FileNotFoundError:  # another rank's temporary file, renamed meanwhile
                pass
        _fsync(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old file or the new one, and the new
    one is on disk when this returns."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


# ---------------------------------------------------------------- which checkpoints are complete

def step_of(name: str) -> int | None:
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def _write_manifest(staged: Path, step: int) -> None:
    """The completeness marker: every file of the checkpoint with its size, written after all of them are
    synced and before the checkpoint is published."""
    files = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
    atomic_write_text(staged / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it (a few words).

    Complete: its MANIFEST is there and every file it lists has the size it had when saved (which catches a
    file truncated or deleted later). Checkpoints saved before manifests existed count as complete when they
    hold state.json: that version published atomically too, with state.json among the last files written."""
    if not path.is_dir():
        return "missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if (path / STATE_FILE).is_file() else f"incomplete (no {MANIFEST})"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"incomplete (unreadable {MANIFEST})"
    for rel, size in files.items():
        try:
            actual = (path / rel).stat().st_size
        except FileNotFoundError:
            return f"incomplete ({rel} is missing)"
        if actual != size:
            return f"incomplete ({rel} has {actual} bytes, {size} when saved)"
    return None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Published checkpoints of a checkpoints/ folder by step; a checkpoint whose re-save was interrupted
    after it was renamed aside (REPLACED) counts in its place."""
    found = {}
    for where in (root / REPLACED, root):  # the published one wins over its aside copy
        if where.is_dir():
            for p in where.iterdir():
                if p.is_dir() and step_of(p.name) is not None:
                    found[p.name] = p
    return sorted((step_of(name), p) for name, p in found.items())


def _locate(root: Path, name: str) -> Path:
    """checkpoints/NAME, or its aside copy when a re-save of NAME was interrupted before the new one moved in."""
    path, aside = root / name, root / REPLACED / name
    return aside if not path.exists() and aside.is_dir() else path


def latest_checkpoint(root: Path, *, usable=checkpoint_problem) -> Path | None:
    """The checkpoint root/latest names if it is usable, else the newest usable one before it (saying so in
    one line); None if there is no checkpoint at all. `usable(path)` -> None, or why the path is not usable."""
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if named:
        path = _locate(root, named)
        why = usable(path)
        if why is None:
            return path
    # Only checkpoints before the one `latest` names: a higher step is left over from an earlier timeline
    # (a resume from an older checkpoint) that the run has since abandoned.
    limit = step_of(named) if named else None
    earlier = [p for s, p in _step_dirs(root) if limit is None or s < limit]
    fallback = next((p for p in reversed(earlier) if usable(p) is None), None)
    if fallback is None:
        if named:
            raise UserError(f"{pointer} names {named}, which is {why}, and {root} holds no complete checkpoint "
                            f"before it; start a new run (another --out) or pass a checkpoint directory")
        return None
    said = f"{pointer} names {named}, which is {why}" if named else f"{pointer} is missing"
    _say(f"{said}: using {fallback}, the newest complete checkpoint{' before it' if named else ''}")
    return fallback


def resolve_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of run_dir (None if there is none yet); a path -> that path."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir / CKPT_DIR)
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"train.resume={resume!r}: {path} is not a complete checkpoint ({problem})")
    return path


# ---------------------------------------------------------------- saving

def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _clean_leftovers(root: Path) -> None:
    """What a save that crashed or failed left behind (rank 0, before any rank writes): staged checkpoints, and
    checkpoints renamed aside for a re-save."""
    shutil.rmtree(root / INCOMING, ignore_errors=True)
    _settle_asides(root)


def _settle_asides(root: Path) -> None:
    """A checkpoint renamed aside for a re-save goes back in place if the new one never got there, and is
    deleted if it did."""
    if (root / REPLACED).is_dir():
        for aside in (root / REPLACED).iterdir():
            if (root / aside.name).exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, root / aside.name)
        _fsync(root)


def _publish(staged: Path, final: Path) -> None:
    """Move the complete staged checkpoint to `final`. A checkpoint already there (a re-save of its tag) is
    renamed aside first and deleted only once the new one is in place: at every moment one complete copy of
    the tag is published or aside, and resume (_locate) and the next save (_clean_leftovers) know both places."""
    root = final.parent
    aside = root / REPLACED / final.name
    if final.exists():
        aside.parent.mkdir(exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        fault_point("checkpoint.replace_aside")
    os.replace(staged, final)
    _fsync(root)  # the rename is on disk before `latest` can name it
    if aside.exists():
        shutil.rmtree(aside)
        _fsync(aside.parent)


def _prune(root: Path, *, step: int, keep: int) -> None:
    """Keep the checkpoint just saved and the keep-1 newest before it, by step. Checkpoints with a higher step
    are left over from a timeline this run abandoned by resuming from an older checkpoint: not old, not
    pruned (the run replaces each when it saves that step again). Whatever `latest` names is never deleted."""
    pointer = root / LATEST
    protected = {checkpoint_name(step), pointer.read_text().strip() if pointer.is_file() else ""}
    older = [p for s, p in _step_dirs(root) if s < step and p.parent == root]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(engine, run_dir: Path, *, step: int, rank: int, shared_state: dict, rank_state: dict,
                    config_yaml: str, model_cfg: dict, preprocess_cfg: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory.

    A save that fails (a full disk) removes what it staged and raises a one-line UserError when the cause is
    the filesystem's; the previous checkpoint and `latest` are untouched."""
    root = run_dir / CKPT_DIR
    incoming = root / INCOMING
    tag = checkpoint_name(step)
    staged, final = incoming / tag, root / tag
    try:
        if rank == 0:
            _clean_leftovers(root)
            incoming.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(incoming), tag=tag, save_latest=False)
        fault_point("checkpoint.write")
        atomic_write_text(staged / rank_file(rank), json.dumps(rank_state))
        _fsync_tree(staged)
        _barrier()
        if rank == 0:
            # Pretrained towers (issue 10): copy what they need besides weights (HF config, tokenizer) into the
            # checkpoint and point the saved architecture there, so it loads without the original directory.
            from contrastive.pretrained import save_model_assets

            model_cfg = save_model_assets(model_cfg, staged)
            (staged / ARCH_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                       indent=2))
            (staged / CONFIG_FILE).write_text(config_yaml)
            (staged / STATE_FILE).write_text(json.dumps(dict(shared_state, step=step), indent=2))
            _fsync_tree(staged)
            _write_manifest(staged, step)
            fault_point("checkpoint.after_write_before_publish")
            _publish(staged, final)
            fault_point("checkpoint.before_latest")
            atomic_write_text(root / LATEST, tag + "\n")
            _prune(root, step=step, keep=keep)
    except BaseException as e:
        shutil.rmtree(staged, ignore_errors=True)
        if rank == 0:
            _settle_asides(root)
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            pointer = root / LATEST
            kept = pointer.read_text().strip() if pointer.is_file() else "none yet"
            raise UserError(f"saving checkpoint {tag} failed: {e.strerror} ({e.filename or root}); "
                            f"checkpoints/latest still names {kept}, intact; free space or fix the directory, "
                            f"then resume with train.resume=latest") from e
        raise
    _barrier()
    return final


def load_checkpoint(engine, path: Path, *, rank: int) -> tuple[dict, dict]:
    """Collective: restore engine (weights, optimizer, LR schedule) from `path`; returns (shared, rank) state."""
    rank_path = path / rank_file(rank)
    if not rank_path.is_file():
        raise UserError(f"checkpoint {path} has no state for rank {rank}: resume with the world size it was saved with")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {path}")
    return json.loads((path / STATE_FILE).read_text()), json.loads(rank_path.read_text())


# ---------------------------------------------------------------- weights for inference and export

def _is_checkpoint(path: Path) -> bool:
    return (path / ARCH_FILE).is_file() and ((path / MODEL_FILE).is_file() or any(path.glob("*model_states.pt")))


def _weights_problem(path: Path) -> str | None:
    """For inference and export: weights and architecture present (and complete, where a manifest says)."""
    if not path.is_dir():
        return "missing"
    if not _is_checkpoint(path):
        return f"without weights or {ARCH_FILE}"
    return checkpoint_problem(path) if (path / MANIFEST).is_file() else None


def find_weights(path: str | Path) -> Path:
    """A run directory (its latest checkpoint), a checkpoint directory, or a model.safetensors file -> a directory."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    if _is_checkpoint(path):
        return path
    if (path / CKPT_DIR).is_dir():
        ckpt = latest_checkpoint(path / CKPT_DIR, usable=_weights_problem)
        if ckpt is not None:
            return ckpt
    if (path / CONFIG_FILE).is_file():
        raise UserError(f"--model {path} is a run directory without checkpoints yet")
    raise UserError(f"--model {path} is not a run directory, a checkpoint or an exported model")


class _SafeTorch:
    """Stands in for the `torch` module inside DeepSpeed's zero_to_fp32 so its loads are weights-only."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        from contrastive.engine import safe_torch_load

        return safe_torch_load(*args, **kwargs)


def load_full_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint directory.

    The module's own states (DeepSpeed's mp_rank_00 file, ZeRO 0-2) hold every parameter and buffer in the
    dtype it trained in; where an optimizer kept an fp32 master copy, that copy replaces them: consolidated
    from ZeRO partitions by DeepSpeed's zero_to_fp32, or, for its BF16_Optimizer (bf16 weights, which zero_to_fp32
    does not read), from each rank's fp32 partition and its slice map. Parameters the optimizer does not hold
    (frozen ones, which zero_to_fp32 leaves out at ZeRO stage 1) keep the module's values."""
    from contrastive.engine import safe_torch_load

    ckpt = Path(ckpt)
    if (ckpt / MODEL_FILE).is_file():
        return load_file(str(ckpt / MODEL_FILE))
    if not any(ckpt.glob("*model_states.pt")):
        raise UserError(f"{ckpt} holds no weights ({MODEL_FILE} or DeepSpeed's model states)")
    state: dict[str, torch.Tensor] = {}
    if (ckpt / DS_MODEL_FILE).is_file():  # not at ZeRO-3, whose per-rank model files hold no weights
        module = safe_torch_load(ckpt / DS_MODEL_FILE)["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    optim_files = sorted(ckpt.glob("*_pp_rank_*_optim_states.pt"), key=_rank_of)
    if optim_files and "single_partition_of_fp32_groups" in safe_torch_load(optim_files[0])["optimizer_state_dict"]:
        state.update(_fp32_from_bf16_optimizer(optim_files, state))  # BF16_Optimizer (bf16 at ZeRO stage 1)
    elif optim_files:
        state.update(_zero_to_fp32(ckpt))
    return {k: v.contiguous() for k, v in state.items()}


def _rank_of(path: Path) -> int:
    return int(path.name.split("_pp_rank_")[1].split("_")[0])


def _fp32_from_bf16_optimizer(files: list[Path], module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master value from BF16_Optimizer checkpoint files in rank order: every rank holds a
    contiguous partition of each parameter group and a map (name -> start, numel) of the fragments in it, so a
    parameter is its fragments concatenated in rank order (as DeepSpeed's universal-checkpoint converter reads it)."""
    from contrastive.engine import safe_torch_load

    fragments: dict[str, list[torch.Tensor]] = {}
    for path in files:
        optim = safe_torch_load(path)["optimizer_state_dict"]
        for partition, mapping in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, address in dict(mapping).items():
                fragments.setdefault(name, []).append(partition.narrow(0, address.start, address.numel))
    return {name: torch.cat(parts).detach().reshape(module[name].shape) for name, parts in fragments.items()}


def _zero_to_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    from contrastive.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _SafeTorch()
    try:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    finally:
        zero_to_fp32.torch = original


def load_arch(ckpt: str | Path) -> dict:
    """model.json of a checkpoint, with paths to files inside the checkpoint (a text tower's) made absolute."""
    from contrastive.pretrained import resolve_model_assets

    arch = json.loads((Path(ckpt) / ARCH_FILE).read_text())
    arch["model_cfg"] = resolve_model_assets(arch["model_cfg"], ckpt)
    return arch
