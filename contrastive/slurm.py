"""Slurm jobs for `contrastive train`: check a request against the config and the cluster, render, submit.

`contrastive slurm submit CONFIG --nodes N --gpus-per-node G [key=value ...]` resolves the run config (file and
overrides, strictly, as `contrastive train` would), checks what it asks for against the cluster (partition,
nodes, GPUs and CPUs per node), against the config (global batch divisible by the ranks) and what the run will
read (model name, shards, evaluator data: contrastive.preflight, as `train` does), then writes the resolved
config into RUN_DIR/slurm/ and a copy of the code into RUN_DIR/code/, renders slurm/train.sbatch and submits
it. Every mistake a user can make is reported in one line before anything is written or queued. Every value
rendered into the job script is quoted (shlex): a run directory is data, never shell code.
"""
from __future__ import annotations

import contextlib
import hashlib
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
from contrastive.preemption import EXIT_PREEMPTED  # light: importing this module imports no torch

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "train.sbatch"
LAUNCHERS = ("srun", "torchrun")
_SUBMISSIONS = "submissions.jsonl"
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# What quoting cannot carry through an #SBATCH line: '%' (Slurm reads it as a filename pattern, %j ...), a
# backslash (sbatch's own parser takes it as an escape even inside quotes), control characters (a newline ends
# the line); and sbatch blanks out the words packjob/hetjob anywhere in an #SBATCH line.
_UNSAFE_PATH_RE = re.compile(r"[%\\\x00-\x1f\x7f]|packjob|hetjob", re.I)
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
# What `slurm submit` copies into RUN_DIR/code/<digest>/ for the job to run (configs/models: our model configs,
# which contrastive.models finds beside the package).
CODE_PARTS = ("contrastive", "eval", "data_prep", "configs/models")
# The job's entry point, written into the recorded copy: run as a script, it has the copy first on sys.path.
CODE_MAIN = "run_contrastive.py"
_CODE_MAIN_PY = '''"""`contrastive` from this recorded copy of the code: Python put this file's folder first on sys.path."""
import os
import sys

sys.path.insert(1, os.getcwd())  # after the copy: plug-ins of the job's working directory, as `python -m` has it
from contrastive.cli import main  # noqa: E402

sys.exit(main())
'''


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
    bad = _UNSAFE_PATH_RE.search(str(path))
    if bad:
        raise UserError(f"{what} {str(path)!r} contains {bad.group(0)!r}, which an #SBATCH line or Slurm's log file "
                        f"pattern cannot carry (a '%', a backslash, a control character, 'packjob' or 'hetjob'); "
                        f"pick another path")


def default_job_name(run_dir: Path) -> str:
    """contrastive-<run directory name>, with anything but letters, digits and . _ + - made '_'."""
    return "contrastive-" + re.sub(r"[^A-Za-z0-9._+-]", "_", run_dir.name)[:100]


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
    if req.job_name and not _JOB_NAME_RE.match(req.job_name):
        raise UserError(f"--job-name {req.job_name!r} must be 1-128 letters, digits, '.', '_', '+' or '-', starting "
                        f"with a letter or digit")
    for flag, value in (("--partition", req.partition), ("--account", req.account), ("--qos", req.qos),
                        *(("--sbatch-arg", arg) for arg in req.sbatch_args)):
        if "\\" in value or re.search(r"[\x00-\x1f\x7f]", value):
            raise UserError(f"{flag} {value!r} contains a backslash or a control character, which an #SBATCH line "
                            f"cannot carry")


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


@contextlib.contextmanager
def _working_dir(path: Path):
    before = os.getcwd()
    try:
        os.chdir(path)
    except OSError as e:
        raise UserError(f"working directory {path}: {e.strerror}") from None
    try:
        yield
    finally:
        os.chdir(before)


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
    # What the run will read, checked here rather than after the queue wait; the job starts in req.workdir.
    from contrastive.preflight import check_run_inputs

    with _working_dir(req.workdir):
        check_run_inputs(cfg)
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


def render(plan: Plan, *, config_file: Path, code_dir: Path, commit: str = "unknown") -> str:
    """The job script for `plan`, reading the resolved config from `config_file` and running the code recorded
    in `code_dir` (record_code); `commit` is the git commit the code was recorded at, for the logs. Every
    value is shell-quoted; sbatch's parser of #SBATCH lines takes the same quoting (plan_job refused what it
    cannot carry)."""
    req = plan.request
    q = shlex.quote
    lines = []
    if req.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={req.gpus_per_node}")
    for flag, value in (("partition", plan.partition), ("time", req.time), ("account", req.account),
                        ("qos", req.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={q(value)}")
    lines += [f"#SBATCH {q(arg)}" for arg in req.sbatch_args]
    env_lines = [f"export {item.split('=', 1)[0]}={q(item.split('=', 1)[1])}" for item in req.env]
    values = {
        "job_name": q(req.job_name or default_job_name(plan.run_dir)),
        "nodes": str(req.nodes),
        "ntasks_per_node": str(plan.ntasks_per_node),
        "cpus_per_task": str(plan.cpus_per_task),
        "sbatch_lines": "\n".join(lines),
        "workdir": q(str(req.workdir)),
        "output": q(f"{plan.run_dir}/logs/slurm-%j.out"),
        "run_dir": q(str(plan.run_dir)),
        "signal_s": str(req.signal_s),
        "config": q(str(config_file)),
        "python": q(req.python),
        "launcher": q(req.launcher),
        "procs_per_node": str(plan.procs_per_node),
        "resume": q(plan.resume),
        "exit_preempted": str(EXIT_PREEMPTED),
        "max_restarts": str(req.max_restarts),
        "env_lines": "\n".join(env_lines),
        "code_dir": q(str(code_dir)),
        "code_main": CODE_MAIN,
        "submit_commit": q(commit),
    }
    return _fill(TEMPLATE.read_text(), values)


# ---------------------------------------------------------------- code version and submission

def code_version(repo: Path) -> dict:
    """The git commit of the code in `repo`, whether the tree differs from it, and that difference."""
    if not shutil.which("git") or not (repo / ".git").exists():  # an installed package, not a checkout
        return {"commit": "unknown", "dirty": None, "diff": ""}
    head = _run(["git", "-C", str(repo), "rev-parse", "HEAD"])
    if head.returncode != 0:
        return {"commit": "unknown", "dirty": None, "diff": ""}
    diff = _run(["git", "-C", str(repo), "diff", "HEAD", "--", "."]).stdout
    return {"commit": head.stdout.strip(), "dirty": bool(diff.strip()), "diff": diff}


def code_files(repo: Path) -> dict[str, Path]:
    """The files a job needs of the code in `repo` (CODE_PARTS), by their path relative to `repo`."""
    files = {}
    for part in CODE_PARTS:
        root = repo / part
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files[path.relative_to(repo).as_posix()] = path
    assert "contrastive/__init__.py" in files, f"no contrastive package in {repo}"
    return files


def code_digest(files: dict[str, Path]) -> str:
    """A digest of the files' paths and contents: one recorded copy per distinct code, whatever its commit."""
    digest = hashlib.sha256()
    for rel, path in sorted(files.items()):
        data = path.read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def record_code(code_dir: Path, *, files: dict[str, Path], version: dict, source: Path) -> None:
    """Copy `files` into `code_dir` (RUN_DIR/code/<digest>) with the job's entry point (CODE_MAIN), VERSION.json
    (commit, dirty) and code.diff (the uncommitted changes, if any). The job script runs that entry point, so a
    requeue runs the code that was submitted, not whatever is checked out by then. A copy already there is the
    same code (its name is the digest) and is kept: a job that still runs from it is not disturbed."""
    if (code_dir / "VERSION.json").is_file():
        return
    incoming = code_dir.parent / f".incoming-{code_dir.name}-{os.getpid()}"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    for rel, src in files.items():
        (incoming / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, incoming / rel)
    (incoming / CODE_MAIN).write_text(_CODE_MAIN_PY)
    if version["diff"]:
        (incoming / "code.diff").write_text(version["diff"])
    record = {"commit": version["commit"], "dirty": version["dirty"], "source": str(source), "files": len(files),
              "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (incoming / "VERSION.json").write_text(json.dumps(record, indent=2) + "\n")
    try:
        incoming.rename(code_dir)
    except OSError:  # a concurrent submission recorded the same code first
        shutil.rmtree(incoming, ignore_errors=True)
        if not (code_dir / "VERSION.json").is_file():
            raise


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
    files = code_files(REPO)
    code_dir = plan.run_dir / "code" / code_digest(files)
    version = code_version(REPO)
    script = render(plan, config_file=config_file, code_dir=code_dir, commit=version["commit"])
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
    record_code(code_dir, files=files, version=version, source=REPO)
    sub.job_id = _sbatch(["--parsable"], script=script).split(";")[0]
    record = {"job_id": sub.job_id, "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": version["commit"], "dirty": version["dirty"], "code": str(code_dir), "nodes": req.nodes,
              "procs_per_node": plan.procs_per_node, "launcher": req.launcher, "partition": plan.partition,
              "config": str(req.config), "overrides": req.overrides, "argv": sys.argv}
    with (slurm_dir / _SUBMISSIONS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return sub
