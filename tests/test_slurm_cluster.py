"""On a real Slurm cluster (slurm/local-cluster.sh: slurmctld + two slurmd nodes on this machine): a 2-node
ZeRO-2 training job, a preempted job (in a run directory with spaces, parentheses and shell characters) that
requeues and resumes, and requests refused before queueing.

Skipped unless `slurm/local-cluster.sh status` says the cluster is up (`.ci/run` brings it up)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastive.config import load_config, resolve_auto
from tests.conftest import REPO

LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
STEPS = 30
pytestmark = pytest.mark.slow


def _cluster_env() -> dict | None:
    if not LOCAL_CLUSTER.is_file():
        return None
    status = subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        return None
    exports = subprocess.run(["bash", str(LOCAL_CLUSTER), "env"], capture_output=True, text=True).stdout
    conf = re.search(r"SLURM_CONF=(\S+)", exports)
    return dict(os.environ, SLURM_CONF=conf.group(1)) if conf else None


@pytest.fixture(scope="module")
def cluster_env() -> dict:
    env = _cluster_env()
    if env is None:
        pytest.skip("local Slurm cluster is not up: run `slurm/local-cluster.sh up` as root (.ci/run does)")
    return env


def _training_overrides(data: dict, steps: int) -> list[str]:
    return [f"data.train={data['train']}", f"data.val={data['val']}", "model.name=tiny-vit-32",
            "train.batch_size=32", f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=1000",
            "data.num_workers=0", "data.shuffle_buffer=64", "optim.lr=1e-3", "optim.warmup_steps=2",
            "eval.evaluators=[]", "deepspeed.zero_stage=2"]


def _submit(env: dict, run_dir: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contrastive.cli", "slurm", "submit",
                           str(REPO / "configs" / "demo.yaml"), "--out", str(run_dir), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def _job(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _logs(run_dir: Path) -> str:
    parts = []
    for path in sorted((run_dir / "logs").rglob("*")):
        if path.is_file():
            parts.append(f"--- {path.relative_to(run_dir)}\n" + "\n".join(path.read_text().splitlines()[-15:]))
    return "\n".join(parts)


def _wait(env: dict, job_id: str, run_dir: Path, timeout_s: float = 420) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                   "BOOT_FAIL", "DEADLINE"):
            return job
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} did not end within {timeout_s:.0f} s; state {_job(env, job_id).get('JobState')}\n"
                f"{_logs(run_dir)}")


def _submitted_job_id(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_runs(cluster_env, synthetic_data, tmp_path_factory) -> dict:
    """Two uninterrupted 2-node jobs, run side by side (each takes one CPU per node): the srun launcher's (the
    reference for the preempted job) and a shorter one with the torchrun launcher."""
    root = tmp_path_factory.mktemp("slurm")
    runs = {}
    for name, args in (("srun", _training_overrides(synthetic_data, STEPS)),
                       ("torchrun", ["--launcher", "torchrun", *_training_overrides(synthetic_data, 10)])):
        run_dir = root / name
        done = _submit(cluster_env, run_dir, ["--nodes", "2", "--gpus-per-node", "0", *args])
        runs[name] = {"run_dir": run_dir, "job_id": _submitted_job_id(done)}
    for run in runs.values():
        run["job"] = _wait(cluster_env, run["job_id"], run["run_dir"])
    return runs


@pytest.fixture(scope="module")
def finished_run(finished_runs) -> dict:
    return finished_runs["srun"]


def test_two_node_zero2_job_trains_on_both_nodes(finished_run):
    run_dir, job_id, job = finished_run["run_dir"], finished_run["job_id"], finished_run["job"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", _logs(run_dir)
    assert job["Restarts"] == "0" and job["NodeList"] == "node[1-2]"  # a run that finishes is not requeued
    # Both ranks ran, one on each node, and each holds its ZeRO-2 share of the optimizer state.
    logs = run_dir / "logs" / f"job-{job_id}-run0"
    assert "rank 0 of 2 (local rank 0) on node node1" in (logs / "rank-0.log").read_text()
    assert "rank 1 of 2 (local rank 0) on node node2" in (logs / "rank-1.log").read_text()
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step_{STEPS:08d}"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 2
    assert {p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert (ckpt / "rank_00000.json").is_file() and (ckpt / "rank_00001.json").is_file()
    # The loss went down.
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(len(r["samples_per_s_per_rank"]) == 2 for r in records)
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, losses
    # The run directory records what ran: resolved config, code version, the job script.
    submission = json.loads((run_dir / "slurm" / "submissions.jsonl").read_text().splitlines()[-1])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert submission["job_id"] == job_id and submission["commit"] == head
    assert f"commit={head}" in (run_dir / "slurm" / "runs.log").read_text()
    submitted, ran = load_config(run_dir / "slurm" / "config.yaml"), load_config(run_dir / "config.yaml")
    assert submitted.train.steps == STEPS and submitted.deepspeed.zero_stage == 2 and ran.train.resume == "latest"
    # The run records its `auto` values as resolved on the (CPU-only) nodes.
    assert dataclasses.replace(ran, train=dataclasses.replace(ran.train, resume="")) == resolve_auto(submitted, cuda=False)


def test_torchrun_launcher_runs_one_torchrun_per_node(finished_runs):
    run_dir, job_id, job = (finished_runs["torchrun"][k] for k in ("run_dir", "job_id", "job"))
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", _logs(run_dir)
    assert job["Restarts"] == "0" and job["NodeList"] == "node[1-2]"
    logs = run_dir / "logs" / f"job-{job_id}-run0"
    assert "torchrun on node node1 (node rank 0)" in (logs / "node-0.log").read_text()
    assert "torchrun on node node2 (node rank 1)" in (logs / "node-1.log").read_text()
    # Each node's torchrun started one worker with its own log; rank 0 (node 0) prints the summary.
    worker_logs = [list((logs / f"torchrun-node{node}").glob(f"{job_id}_*/attempt_0/0/stdout.log")) for node in (0, 1)]
    assert [len(found) for found in worker_logs] == [1, 1]
    assert "finished at step 10" in worker_logs[0][0].read_text()
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, 11))
    ckpt = run_dir / "checkpoints" / "step_00000010"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert (ckpt / "rank_00000.json").is_file() and (ckpt / "rank_00001.json").is_file()


def test_preempted_job_requeues_and_resumes_with_every_step_logged_once(cluster_env, synthetic_data, finished_run,
                                                                        tmp_path):
    # sbatch reads the quoted #SBATCH lines (--output, --chdir) and bash the quoted script as they are meant.
    run_dir = tmp_path / "my run (requeued); it's #1"
    job_id = _submitted_job_id(_submit(cluster_env, run_dir, ["--nodes", "2", "--gpus-per-node", "0",
                                                              *_training_overrides(synthetic_data, STEPS)]))
    # Midway, the USR1 that Slurm sends --signal-seconds before the time limit (B: = the batch shell).
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 8):
        assert time.monotonic() < deadline and _job(cluster_env, job_id).get("JobState") in ("PENDING", "RUNNING"), \
            _logs(run_dir)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster_env, check=True)
    job = _wait(cluster_env, job_id, run_dir)

    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", _logs(run_dir)
    assert job["Restarts"] == "1", _logs(run_dir)
    first = (run_dir / "logs" / f"job-{job_id}-run0" / "rank-0.log").read_text()
    stopped_at = int(re.search(r"stopped early on request .* at step (\d+)", first).group(1))
    assert 8 <= stopped_at < STEPS
    second = (run_dir / "logs" / f"job-{job_id}-run1" / "rank-0.log").read_text()
    assert f"finished at step {STEPS}" in second
    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "requeueing to continue from the last checkpoint" in batch_log and "run 1: training finished" in batch_log
    # Both runs ran the code recorded at submission, not the checkout the job was submitted from.
    runs = (run_dir / "slurm" / "runs.log").read_text().splitlines()
    code_dir = json.loads((run_dir / "slurm" / "submissions.jsonl").read_text())["code"]
    assert len(runs) == 2 and all(f"code={code_dir} " in line for line in runs), runs
    # Every step logged exactly once, and the resumed run continued the uninterrupted run's trajectory.
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    reference = {r["step"]: r["loss"] for r in _metrics(finished_run["run_dir"])}
    for r in records:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-4, abs=1e-5), (r["step"], stopped_at)


def test_bad_requests_are_refused_before_anything_is_queued(cluster_env, tmp_path):
    def queued() -> set[str]:
        return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=cluster_env,
                                  check=True).stdout.split())

    queued_before = queued()
    cases = [
        (["--gpus-per-node", "1"], "--gpus-per-node 1: the nodes of partition 'debug' have at most 0 GPU(s) each"),
        (["--gpus-per-node", "0", "--partition", "gpu-a100"],
         "partition 'gpu-a100' does not exist on this cluster (partitions: debug)"),
        (["--gpus-per-node", "0", "--nodes", "3", "train.batch_size=48"], "--nodes 3: partition 'debug' has only 2 node(s)"),
    ]
    for args, message in cases:
        done = _submit(cluster_env, tmp_path / "run", args)
        assert done.returncode == 2 and done.stderr.strip() == f"contrastive slurm: error: {message}", done.stderr
    missing = subprocess.run([sys.executable, "-m", "contrastive.cli", "slurm", "submit", "configs/nope.yaml",
                              "--gpus-per-node", "0", "--out", str(tmp_path / "run")],
                             capture_output=True, text=True, env=cluster_env, cwd=REPO)
    assert missing.returncode == 2 and "config file configs/nope.yaml does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert not queued() - queued_before
