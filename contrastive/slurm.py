"""Slurm jobs for `contrastive train`: check a request against the config and the cluster, render, submit.

`contrastive slurm submit CONFIG --nodes N --gpus-per-node G [key=value ...]` resolves the run config (file and
overrides, strictly, as `contrastive train` would), checks what it asks for against the cluster (partition,
nodes, GPUs and CPUs per node) and against the config (global batch divisible by the ranks), then writes the
resolved config and the code version into RUN_DIR/slurm/, renders slurm/train.sbatch and submits it. Every
mistake a user can make is reported in one line before anything is written or queued.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from contrastive.errors import UserError
from contrastive.preemption import EXIT_PREEMPTED  # light: submitting imports no torch

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "train.sbatch"
LAUNCHERS = ("srun", "torchrun")
_SUBMISSIONS = "submissions.jsonl"
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# Characters that break an #SBATCH line or that Slurm would read as a filename pattern (%j, ...).
_UNSAFE_PATH_RE = re.compile(r"[\s%'\"\\$`]")


@dataclass
class JobRequest:
    """What a user asks for; `contrastive slurm submit` builds one from its arguments."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU, or 1 without GPUs
    cpus_per_task: int = 0  # 0: data.num_workers + 1 per training process
    launcher: str = "srun"
    partition: str = ""
    time: str = ""
    account: str = ""
    qos: str = ""
    job_name: str = ""
    run_dir: Path | None = None
    signal_s: int = 300
    max_restarts: int = 20
    sbatch_args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)


@dataclass
class Plan:
    """A checked request: everything the job script needs."""

    request: JobRequest
    config_yaml: str
    run_dir: Path
    procs_per_node: int
    ntasks_per_node: int  # Slurm tasks: one per process (srun) or one per node (torchrun)
    cpus_per_task: int
    cpus_per_proc: int
    partition: str  # "" leaves it to the cluster's default partition
    resume: str  # where the first run starts from while the run directory has no checkpoint
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.request.nodes * self.procs_per_node


# ---------------------------------------------------------------- the cluster, as scontrol describes it

@dataclass
class Node:
    name: str
    cpus: int
    gpus: int
    partitions: list[str]
    state: str


@dataclass
class Partition:
    name: str
    nodes: list[str]
    default: bool
    state: str


@dataclass
class Cluster:
    partitions: dict[str, Partition]
    nodes: dict[str, Node]

    @property
    def default_partition(self) -> str:
        return next((p.name for p in self.partitions.values() if p.default), "")


def parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """`scontrol show <entity> -o` output (one `Key=Value ...` record per line) -> dicts. Values may hold
    spaces (OS=Linux 6.1 #1 SMP): a value runs until the next ` Key=`."""
    records = []
    for line in text.splitlines():
        if "=" not in line:
            continue
        pairs = re.findall(r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s+[A-Za-z][\w/:.]*=|\s*$)", line)
        records.append(dict(pairs))
    return records


def gpu_count(gres: str) -> int:
    """GPUs in a node's Gres string: 'gpu:8', 'gpu:a100:4(S:0-1),gpu:h100:4', '(null)' -> 8, 8, 0."""
    return sum(int(n) for n in re.findall(r"\bgpu(?::[^:,(\s]+)?:(\d+)", gres or ""))


def cluster_from_scontrol(partitions_text: str, nodes_text: str) -> Cluster:
    parts = {}
    for rec in parse_scontrol_records(partitions_text):
        if "PartitionName" in rec:
            parts[rec["PartitionName"]] = Partition(rec["PartitionName"], [], rec.get("Default") == "YES",
                                                    rec.get("State", "UP"))
    nodes = {}
    for rec in parse_scontrol_records(nodes_text):
        if "NodeName" not in rec:
            continue
        cpus = rec.get("CPUEfctv") or rec.get("CPUTot") or "0"
        in_parts = [p for p in rec.get("Partitions", "").split(",") if p]
        nodes[rec["NodeName"]] = Node(rec["NodeName"], int(cpus) if cpus.isdigit() else 0,
                                      gpu_count(rec.get("Gres", "")), in_parts, rec.get("State", ""))
        for p in in_parts:
            if p in parts:
                parts[p].nodes.append(rec["NodeName"])
    return Cluster(parts, nodes)


def _run(cmd: list[str], *, input_text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, input=input_text, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(cmd[:3])}` did not answer within 60 s: is slurmctld reachable?") from None


def query_cluster() -> Cluster | None:
    """The partitions and nodes slurmctld knows; None where there is no `scontrol` on PATH."""
    if not shutil.which("scontrol"):
        return None
    outputs = []
    for entity in ("partition", "node"):
        done = _run(["scontrol", "show", entity, "-o"])
        if done.returncode != 0:
            first = (done.stderr.strip() or done.stdout.strip()).splitlines()[:1]
            raise UserError(f"cannot reach the Slurm controller (`scontrol show {entity}`: "
                            f"{first[0] if first else 'exit ' + str(done.returncode)})")
        outputs.append(done.stdout)
    return cluster_from_scontrol(*outputs)


# ---------------------------------------------------------------- checks

def time_limit_seconds(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> seconds."""
    m = _TIME_RE.match(text)
    if not m:
        raise UserError(f"--time {text!r} is not a Slurm time (minutes, H:M:S or D-H:M:S, e.g. 2-00:00:00)")
    days, a, b, c = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + a * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return a * 60 + int(b)
    return a * 60  # M


def _check_path(path: Path, what: str) -> None:
    if _UNSAFE_PATH_RE.search(str(path)):
        raise UserError(f"{what} {path} contains a space, quote, '$' or '%', which #SBATCH lines and Slurm's "
                        f"log file patterns cannot carry; pick a plainer path")


def _check_request(req: JobRequest) -> None:
    if req.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {req.nodes}")
    if req.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {req.gpus_per_node}")
    if req.tasks_per_node < 0 or req.cpus_per_task < 0:
        raise UserError("--tasks-per-node and --cpus-per-task must be >= 0 (0 picks the default)")
    if req.gpus_per_node and req.tasks_per_node not in (0, req.gpus_per_node):
        raise UserError(f"--tasks-per-node {req.tasks_per_node} with --gpus-per-node {req.gpus_per_node}: "
                        f"training runs one process per GPU; leave --tasks-per-node out")
    if req.launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {req.launcher!r}")
    if req.signal_s < 10:
        raise UserError(f"--signal-seconds must be >= 10 (time to finish a step and checkpoint), got {req.signal_s}")
    if req.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {req.max_restarts}")
    if req.time and time_limit_seconds(req.time) <= req.signal_s:
        raise UserError(f"--time {req.time} must be longer than --signal-seconds {req.signal_s} "
                        f"(the warning before the time limit)")
    for item in req.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
            raise UserError(f"--env {item!r} must look like NAME=value")
    for arg in req.sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise UserError(f"--sbatch-arg {arg!r} must be one sbatch option, e.g. --sbatch-arg=--exclusive")


def _check_against_cluster(plan: Plan, cluster: Cluster) -> None:
    req = plan.request
    names = ", ".join(sorted(cluster.partitions)) or "none"
    if plan.partition:
        if plan.partition not in cluster.partitions:
            raise UserError(f"partition {plan.partition!r} does not exist on this cluster (partitions: {names})")
        part = cluster.partitions[plan.partition]
    else:
        default = cluster.default_partition
        if not default:
            raise UserError(f"this cluster has no default partition; pass --partition (partitions: {names})")
        part = cluster.partitions[default]
        plan.notes.append(f"partition: {default} (the cluster's default)")
    nodes = [cluster.nodes[n] for n in part.nodes if n in cluster.nodes]
    if req.gpus_per_node:
        most = max((n.gpus for n in nodes), default=0)
        enough = [n for n in nodes if n.gpus >= req.gpus_per_node]
        if not enough:
            raise UserError(f"--gpus-per-node {req.gpus_per_node}: the nodes of partition {part.name!r} have at most "
                            f"{most} GPU(s) each")
        if len(enough) < req.nodes:
            raise UserError(f"--nodes {req.nodes} --gpus-per-node {req.gpus_per_node}: only {len(enough)} node(s) of "
                            f"partition {part.name!r} have {req.gpus_per_node} GPUs")
    if req.nodes > len(nodes):
        raise UserError(f"--nodes {req.nodes}: partition {part.name!r} has only {len(nodes)} node(s)")
    cpus_needed = plan.ntasks_per_node * plan.cpus_per_task
    fitting = [n for n in nodes if n.cpus >= cpus_needed]
    if len(fitting) < req.nodes:
        most = max((n.cpus for n in nodes), default=0)
        raise UserError(f"{plan.procs_per_node} process(es) per node x {plan.cpus_per_proc} CPU(s) need {cpus_needed} "
                        f"CPUs per node; partition {part.name!r} has {len(fitting)} node(s) with that many (at most "
                        f"{most}): lower data.num_workers or pass --cpus-per-task")


def _check_run_dir_free(run_dir: Path) -> None:
    """A run directory belongs to one job at a time: two jobs writing one checkpoint folder corrupt it."""
    log = run_dir / "slurm" / _SUBMISSIONS
    if not log.is_file() or not shutil.which("squeue"):
        return
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    if not lines:
        return
    job_id = str(json.loads(lines[-1]).get("job_id", ""))
    if not job_id:
        return
    done = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    state = done.stdout.strip() if done.returncode == 0 else ""
    if state:
        raise UserError(f"run directory {run_dir} belongs to job {job_id}, which is {state.split()[0]}; "
                        f"wait for it, `scancel {job_id}`, or pick another --out")


def plan_job(req: JobRequest, *, cluster: Cluster | None) -> Plan:
    """Check `req` (config, numbers, and the cluster when given); raises UserError on the first problem."""
    from contrastive.config import load_config, to_dict

    import yaml

    _check_request(req)
    cfg = load_config(req.config, req.overrides)  # ConfigError (a UserError) for a missing file or a bad key
    run_dir = (req.run_dir or Path("runs") / Path(req.config).stem)
    run_dir = (req.workdir / run_dir).resolve() if not run_dir.is_absolute() else run_dir
    _check_path(run_dir, "run directory")
    _check_path(req.workdir, "working directory")
    procs = req.gpus_per_node or req.tasks_per_node or 1
    per_proc_cpus = req.cpus_per_task or cfg.data.num_workers + 1
    ranks = req.nodes * procs
    if cfg.train.batch_size % (ranks * cfg.train.accum_steps):
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by {ranks} ranks x "
                        f"train.accum_steps={cfg.train.accum_steps}; change one of them")
    if req.launcher == "torchrun":
        ntasks, cpus = 1, procs * per_proc_cpus
    else:
        ntasks, cpus = procs, per_proc_cpus
    plan = Plan(request=req, config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False), run_dir=run_dir,
                procs_per_node=procs, ntasks_per_node=ntasks, cpus_per_task=cpus, cpus_per_proc=per_proc_cpus,
                partition=req.partition, resume=cfg.train.resume or "latest")
    if cluster is not None:
        _check_against_cluster(plan, cluster)
    if (run_dir / "checkpoints" / "latest").is_file():
        plan.notes.append(f"{run_dir} has a checkpoint; the job continues from it")
    plan.notes.append(f"{req.nodes} node(s) x {procs} process(es) = {ranks} ranks, "
                      f"{cfg.train.batch_size // ranks} samples per rank per step")
    return plan


# ---------------------------------------------------------------- rendering

def _fill(template: str, values: dict[str, str]) -> str:
    missing = set(re.findall(r"{{(\w+)}}", template)) - set(values)
    assert not missing, f"template placeholders without a value: {missing}"
    # A placeholder alone on its line with nothing to fill in takes its line with it.
    template = re.sub(r"^{{(\w+)}}\n", lambda m: values[m.group(1)] + "\n" if values[m.group(1)] else "", template,
                      flags=re.M)
    return re.sub(r"{{(\w+)}}", lambda m: values[m.group(1)], template)


def render(plan: Plan, *, config_file: Path, commit: str = "unknown") -> str:
    """The job script for `plan`, reading the resolved config from `config_file`; `commit` is the code version
    at submission (each run logs a note when the code it runs differs)."""
    req = plan.request
    q = shlex.quote
    lines = []
    if req.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={req.gpus_per_node}")
    for flag, value in (("partition", plan.partition), ("time", req.time), ("account", req.account),
                        ("qos", req.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {arg}" for arg in req.sbatch_args]
    env_lines = [f"export {item.split('=', 1)[0]}={q(item.split('=', 1)[1])}" for item in req.env]
    values = {
        "job_name": req.job_name or f"contrastive-{plan.run_dir.name}",
        "nodes": str(req.nodes),
        "ntasks_per_node": str(plan.ntasks_per_node),
        "cpus_per_task": str(plan.cpus_per_task),
        "sbatch_lines": "\n".join(lines),
        "workdir": str(req.workdir),
        "run_dir": str(plan.run_dir),
        "signal_s": str(req.signal_s),
        "config": q(str(config_file)),
        "python": q(req.python),
        "launcher": req.launcher,
        "procs_per_node": str(plan.procs_per_node),
        "resume": q(plan.resume),
        "exit_preempted": str(EXIT_PREEMPTED),
        "max_restarts": str(req.max_restarts),
        "env_lines": "\n".join(env_lines),
        "repo": str(REPO),
        "submit_commit": commit,
    }
    return _fill(TEMPLATE.read_text(), values)


# ---------------------------------------------------------------- code version and submission

def code_version(repo: Path = REPO) -> dict:
    """The git commit of the code a job runs, whether the tree differs from it, and that difference."""
    if not shutil.which("git"):
        return {"commit": "unknown", "dirty": None, "diff": ""}
    head = _run(["git", "-C", str(repo), "rev-parse", "HEAD"])
    if head.returncode != 0:
        return {"commit": "unknown", "dirty": None, "diff": ""}
    diff = _run(["git", "-C", str(repo), "diff", "HEAD", "--", "."]).stdout
    return {"commit": head.stdout.strip(), "dirty": bool(diff.strip()), "diff": diff}


def _sbatch(args: list[str], *, script: str) -> str:
    done = _run(["sbatch", *args], input_text=script)
    if done.returncode != 0:
        lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        message = lines[-1].strip() if lines else f"exit {done.returncode}"
        raise UserError(f"sbatch refused the job: {message.removeprefix('sbatch: error: ')}")
    return done.stdout.strip() + done.stderr.strip()


@dataclass
class Submission:
    script: str
    plan: Plan
    job_id: str = ""
    cluster_checked: bool = False


def submit(req: JobRequest, *, dry_run: bool = False) -> Submission:
    """Check, then (unless dry_run) write RUN_DIR/slurm/{config.yaml,job.sbatch,...} and sbatch the script."""
    unreachable = ""
    try:
        cluster = query_cluster()
    except UserError as e:
        if not dry_run:
            raise
        cluster, unreachable = None, str(e)
    if cluster is None and not dry_run:
        raise UserError("sbatch/scontrol not found: submit from a Slurm login node "
                        "(or start one here with `slurm/local-cluster.sh up` and export its SLURM_CONF)")
    plan = plan_job(req, cluster=cluster)
    if unreachable:
        plan.notes.append(unreachable)
    slurm_dir = plan.run_dir / "slurm"
    config_file = slurm_dir / "config.yaml"
    version = code_version()
    script = render(plan, config_file=config_file, commit=version["commit"])
    sub = Submission(script=script, plan=plan, cluster_checked=cluster is not None)
    if cluster is not None:
        _check_run_dir_free(plan.run_dir)
        # Everything else Slurm itself would refuse (account, qos, time above the partition's limit ...).
        estimate = _sbatch(["--test-only"], script=script)
        plan.notes.append(estimate.removeprefix("sbatch: "))
    if dry_run:
        return sub

    slurm_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "logs").mkdir(exist_ok=True)
    config_file.write_text(plan.config_yaml)
    (slurm_dir / "job.sbatch").write_text(script)
    if version["dirty"]:
        (slurm_dir / "code.diff").write_text(version["diff"])
    sub.job_id = _sbatch(["--parsable"], script=script).split(";")[0]
    record = {"job_id": sub.job_id, "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": version["commit"], "dirty": version["dirty"], "nodes": req.nodes,
              "procs_per_node": plan.procs_per_node, "launcher": req.launcher, "partition": plan.partition,
              "config": str(req.config), "overrides": req.overrides, "argv": sys.argv}
    with (slurm_dir / _SUBMISSIONS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return sub
