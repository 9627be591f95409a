"""Slurm job scripts without a cluster: scontrol parsing, request checks, rendering, and the job script's
preemption/requeue logic run under fake `srun`/`scontrol` (the real cluster tests are in test_slurm_cluster.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastive import slurm
from contrastive.cli import main
from contrastive.errors import UserError
from tests.conftest import REPO

# Real `scontrol show partition -o` / `show node -o` lines (Slurm 22.05, slurm/local-cluster.sh), plus a
# GPU partition in the same format.
PARTITIONS = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 Nodes=node[1-2] State=UP TotalCPUs=4 "
    "TotalNodes=2 TRES=cpu=4,mem=2000M,node=2,billing=4\n"
    "PartitionName=gpu AllowGroups=ALL Default=NO Nodes=gpu[01-05] State=UP TotalCPUs=480 TotalNodes=5\n")
NODES = "".join(
    f"NodeName=node{i} Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=8.77 "
    f"AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=vm Port=1681{7 + i} "
    f"Version=22.05.8 OS=Linux 6.18.44-fc-v782 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1000 AllocMem=0 State=IDLE "
    f"Partitions=debug  CfgTRES=cpu=2,mem=1000M,billing=2 AllocTRES= CapWatts=n/a\n" for i in (1, 2)) + "".join(
    f"NodeName=gpu0{i} Arch=x86_64 CPUAlloc=0 CPUEfctv=96 CPUTot=96 Gres={gres} NodeAddr=10.1.0.{i} "
    f"OS=Linux 5.15 #1 SMP State=IDLE Partitions=gpu\n"
    for i, gres in ((1, "gpu:h100:8(S:0-1)"), (2, "gpu:h100:8(S:0-1)"), (3, "gpu:h100:8(S:0-1)"), (4, "gpu:4"),
                    (5, "gpu:8")))


@pytest.fixture()
def cluster() -> slurm.Cluster:
    return slurm.cluster_from_scontrol(PARTITIONS, NODES)


@pytest.fixture()
def inputs(synthetic_data) -> list[str]:
    """Overrides that point configs/demo.yaml at data that exists (submitting checks that it does)."""
    return [f"data.train={synthetic_data['train']}", "eval.evaluators=[]"]


def _request(tmp_path, inputs: list[str], **kw) -> slurm.JobRequest:
    defaults = dict(config=REPO / "configs" / "demo.yaml", run_dir=tmp_path / "run", workdir=tmp_path,
                    overrides=["train.batch_size=64"])
    req = {**defaults, **kw}
    return slurm.JobRequest(**dict(req, overrides=inputs + req["overrides"]))


def test_scontrol_records_keep_values_with_spaces_and_empty_values():
    rec = slurm.parse_scontrol_records(NODES)[0]
    assert rec["NodeName"] == "node1" and rec["CPUTot"] == "2" and rec["Gres"] == "(null)"
    assert rec["OS"] == "Linux 6.18.44-fc-v782 #1 SMP PREEMPT_DYNAMIC @0"
    assert rec["AllocTRES"] == "" and rec["CapWatts"] == "n/a" and rec["CfgTRES"] == "cpu=2,mem=1000M,billing=2"


@pytest.mark.parametrize("gres,count", [("(null)", 0), ("", 0), ("gpu:8", 8), ("gpu:h100:8(S:0-1)", 8),
                                        ("gpu:a100:4(S:0),gpu:h100:4(S:1)", 8), ("mps:100,gpu:2", 2)])
def test_gpu_count_from_gres(gres, count):
    assert slurm.gpu_count(gres) == count


def test_cluster_from_scontrol(cluster):
    assert cluster.default_partition == "debug"
    assert cluster.partitions["debug"].nodes == ["node1", "node2"]
    assert [cluster.nodes[n].gpus for n in cluster.partitions["gpu"].nodes] == [8, 8, 8, 4, 8]
    assert cluster.nodes["gpu01"].cpus == 96


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-0", 86400),
                                          ("1-02:30", 95400), ("2-00:00:05", 172805)])
def test_time_limits(text, seconds):
    assert slurm.time_limit_seconds(text) == seconds


@pytest.mark.parametrize("kw,message", [
    (dict(gpus_per_node=8, nodes=4, partition="debug"), "nodes of partition 'debug' have at most 0 GPU(s)"),
    (dict(gpus_per_node=8, nodes=5, partition="gpu", overrides=["train.batch_size=640"]),
     "only 4 node(s) of partition 'gpu' have 8 GPUs"),
    (dict(gpus_per_node=16, partition="gpu"), "have at most 8 GPU(s) each"),
    (dict(partition="nope"), "partition 'nope' does not exist on this cluster (partitions: debug, gpu)"),
    (dict(nodes=4), "--nodes 4: partition 'debug' has only 2 node(s)"),
    (dict(tasks_per_node=2, cpus_per_task=2), "need 4 CPUs per node"),
    (dict(config=Path("configs/missing.yaml")), "config file configs/missing.yaml does not exist"),
    (dict(overrides=["train.stepz=3"]), "unknown config key 'train.stepz'"),
    (dict(nodes=3, partition="gpu", gpus_per_node=1), "train.batch_size=64 is not divisible by 3 ranks"),
    (dict(gpus_per_node=8, tasks_per_node=4, partition="gpu"), "one process per GPU"),
    (dict(time="1:00", signal_s=300), "must be longer than --signal-seconds 300"),
    (dict(time="soon"), "is not a Slurm time"),
    (dict(env=["NCCL DEBUG=INFO"]), "must look like NAME=value"),
])
def test_bad_requests_fail_before_anything_is_written(tmp_path, inputs, cluster, kw, message):
    with pytest.raises(UserError) as e:
        slurm.plan_job(_request(tmp_path, inputs, **kw), cluster=cluster)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw,message", [
    (dict(run_dir="run-%j"), "contains '%'"),  # Slurm would expand it in --output
    (dict(run_dir="run\\x"), r"contains '\\'"),  # sbatch's parser takes it as an escape even inside quotes
    (dict(run_dir="run\nx"), r"contains '\n'"),
    (dict(run_dir="my-hetjob"), "contains 'hetjob'"),  # sbatch blanks the word out of #SBATCH lines
    (dict(job_name="my job"), "--job-name 'my job' must be 1-128 letters, digits"),
    (dict(job_name="a;b"), "--job-name 'a;b' must be"),
    (dict(account="x\\y"), r"--account 'x\\y' contains a backslash"),
])
def test_what_an_sbatch_line_cannot_carry_is_refused_in_one_line(tmp_path, inputs, cluster, kw, message):
    if "run_dir" in kw:
        kw["run_dir"] = tmp_path / kw["run_dir"]
    with pytest.raises(UserError) as e:
        slurm.plan_job(_request(tmp_path, inputs, **kw), cluster=cluster)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpu_job_renders_one_task_per_gpu_and_the_preemption_settings(tmp_path, inputs, cluster):
    plan = slurm.plan_job(_request(tmp_path, inputs, nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00",
                                   signal_s=240, env=["NCCL_DEBUG=WARN"], sbatch_args=["--exclusive"],
                                   overrides=["train.batch_size=32768", "data.num_workers=6"]), cluster=cluster)
    assert plan.world_size == 32 and plan.cpus_per_task == 7  # data workers + the rank itself
    script = slurm.render(plan, config_file=tmp_path / "run" / "slurm" / "config.yaml", code_dir=tmp_path / "code")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=7", "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --exclusive", "#SBATCH --signal=B:USR1@240", "#SBATCH --requeue",
                 f"#SBATCH --output={tmp_path}/run/logs/slurm-%j.out", "LAUNCHER=srun", "export NCCL_DEBUG=WARN",
                 f"EXIT_PREEMPTED={slurm.EXIT_PREEMPTED}", f"PYTHON={sys.executable}"):
        assert line in script.splitlines(), line
    # sbatch reads #SBATCH lines only up to the first command
    header = script.split("\nset -uo pipefail")[0]
    assert header.count("#SBATCH") == script.count("#SBATCH")
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_torchrun_launcher_runs_one_task_per_node_with_all_its_cpus(tmp_path, inputs, cluster):
    plan = slurm.plan_job(_request(tmp_path, inputs, nodes=2, gpus_per_node=8, partition="gpu", launcher="torchrun",
                                   overrides=["train.batch_size=64", "data.num_workers=3"]), cluster=cluster)
    script = slurm.render(plan, config_file=tmp_path / "c.yaml", code_dir=tmp_path / "code")
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=32" in script
    assert "PROCS_PER_NODE=8" in script and "LAUNCHER=torchrun" in script
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script


def test_exit_code_matches_the_trainer():
    from contrastive.train import EXIT_PREEMPTED

    assert slurm.EXIT_PREEMPTED == EXIT_PREEMPTED


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, inputs, monkeypatch, capsys, cluster):
    monkeypatch.setattr(slurm, "query_cluster", lambda: None)  # no Slurm here: config checks only
    run = tmp_path / "run"
    code = main(["slurm", "submit", str(REPO / "configs" / "demo.yaml"), "--nodes", "2", "train.steps=7",
                 "--gpus-per-node", "0", "--out", str(run), "--dry-run", "model.name=tiny-vit-32", *inputs])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in out
    assert "nothing submitted" in err and "checked the config only" in err
    assert not run.exists()


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch, capsys, cluster):
    monkeypatch.setattr(slurm, "query_cluster", lambda: cluster)
    code = main(["slurm", "submit", str(REPO / "configs" / "demo.yaml"), "--gpus-per-node", "8",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == "contrastive slurm: error: --gpus-per-node 8: the nodes of partition 'debug' have at most 0 GPU(s) each"


def test_submit_writes_the_resolved_config_and_code_version(tmp_path, inputs, monkeypatch, cluster):
    calls = []

    def fake_sbatch(args, *, script):
        calls.append((args, script))
        return "Job 9 to start at now" if "--test-only" in args else "4242"

    monkeypatch.setattr(slurm, "query_cluster", lambda: cluster)
    monkeypatch.setattr(slurm, "_sbatch", fake_sbatch)
    sub = slurm.submit(_request(tmp_path, inputs, nodes=2, overrides=["train.batch_size=64", "train.steps=11"]))
    run = tmp_path / "run"
    assert sub.job_id == "4242" and [c[0] for c in calls] == [["--test-only"], ["--parsable"]]
    assert calls[0][1] == calls[1][1] == (run / "slurm" / "job.sbatch").read_text()
    from contrastive.config import load_config

    resolved = load_config(run / "slurm" / "config.yaml")
    assert resolved.train.steps == 11 and resolved == load_config(REPO / "configs" / "demo.yaml",
                                                                  [*inputs, "train.batch_size=64", "train.steps=11"])
    record = json.loads((run / "slurm" / "submissions.jsonl").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["job_id"] == "4242" and record["commit"] == head and record["nodes"] == 2
    assert (run / "logs").is_dir()
    # The code it runs: a copy of the package sources, named by their digest, that the job script points at.
    code = Path(record["code"])
    assert code.parent == run / "code" and f"CODE_DIR={code}" in calls[1][1].splitlines()
    assert json.loads((code / "VERSION.json").read_text())["commit"] == head
    for rel, src in slurm.code_files(REPO).items():
        assert (code / rel).read_bytes() == src.read_bytes(), rel


# ---------------------------------------------------------------- the job script under fake srun/scontrol

FAKE_SRUN = """#!/bin/bash
# Runs the step as rank 0 of 1 in this process (exec), so signals sent to "srun" reach the task.
while [[ $1 == -* ]]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURMD_NODENAME=node1
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1; echo node2 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=$3 State=ALLOCATED" ;;
  "requeue "*) echo "requeue $2" >> "$FAKE_LOG" ;;
esac
"""
# Stands in for the trainer: records how it was started, then finishes, crashes, or (like contrastive.train)
# exits with EXIT_PREEMPTED once USR1 arrives; "slow-start" installs its USR1 handler only after 1.5 s.
FAKE_PYTHON = f"""#!{sys.executable}
import os, signal, sys, time
log = open(os.environ["FAKE_LOG"], "a", buffering=1)
env = os.environ
log.write(f"args={{' '.join(sys.argv[1:])}} rank={{env['RANK']}} world={{env['WORLD_SIZE']}} "
          f"local={{env['LOCAL_RANK']}} master={{env['MASTER_ADDR']}}:{{env['MASTER_PORT']}}\\n")
mode = env["FAKE_MODE"]
if mode in ("finish", "crash"):
    sys.exit(0 if mode == "finish" else 1)
stop = []
if mode == "slow-start":
    open(env["FAKE_LOG"] + ".ready", "w").close()
    time.sleep(1.5)  # still importing: USR1 is ignored (the job script started us that way)
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
open(env["FAKE_LOG"] + ".ready", "w").close()
for _ in range(300):
    if stop:
        log.write("stopping\\n")
        sys.exit(75)
    time.sleep(0.1)
sys.exit(3)
"""


def _fake_job(tmp_path, inputs, *, mode: str, restart: int = 0, resume: str = "", signal_batch: bool = False,
              signal_task: bool = False, checkpoint: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    overrides = ["train.batch_size=64"] + ([f"train.resume={resume}"] if resume else [])
    plan = slurm.plan_job(_request(tmp_path, inputs, python=str(bin_dir / "python"), overrides=overrides, max_restarts=3),
                          cluster=None)
    script = tmp_path / "job.sh"
    code_dir = tmp_path / "run" / "code" / "0123"
    slurm.record_code(code_dir, files=slurm.code_files(REPO), version=slurm.code_version(REPO), source=REPO)
    script.write_text(slurm.render(plan, config_file=tmp_path / "run" / "slurm" / "config.yaml", code_dir=code_dir,
                                   commit="0123abc"))
    if checkpoint:
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000005\n")
    log = tmp_path / "fake.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_MODE=mode,
               SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_NTASKS="2",
               SLURM_RESTART_COUNT=str(restart), CONTRASTIVE_SLURM_POLL_S="0.2")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if signal_batch or signal_task:
        ready = Path(f"{log}.ready")
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else "fake trainer not started"
        if signal_batch:  # what Slurm does --signal-seconds before the time limit (B: = the batch shell only)
            proc.send_signal(signal.SIGUSR1)
        else:  # `scancel --signal=USR1 JOB` without --batch: the tasks only
            trainer = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert trainer, "no trainer process under the job script"
            os.kill(int(trainer[0]), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, log.read_text() if log.exists() else ""


def test_job_script_that_finishes_does_not_requeue(tmp_path, inputs):
    rc, out, log = _fake_job(tmp_path, inputs, mode="finish")
    assert rc == 0 and "training finished" in out
    assert "requeue" not in log
    started = log.splitlines()[0]
    assert f"--config {tmp_path}/run/slurm/config.yaml --out {tmp_path}/run train.resume=latest" in started
    assert "rank=0 world=1 local=0" in started
    assert "master=10.9.8.7:21234" in started  # NodeAddr of the first node; 20000 + job id % 20000
    assert (tmp_path / "run" / "slurm" / "runs.log").read_text().count("job=1234 run=0") == 1
    assert f"code {tmp_path}/run/code/0123 (commit 0123abc)" in out


def test_job_script_requeues_after_usr1_to_the_batch_shell(tmp_path, inputs):
    rc, out, log = _fake_job(tmp_path, inputs, mode="preempt", signal_batch=True)
    assert rc == 0, out
    assert log.splitlines()[1:] == ["stopping", "requeue 1234"]
    assert "USR1: asking the ranks to checkpoint" in out and "requeueing" in out


def test_usr1_while_the_trainer_starts_is_repeated_until_it_lands(tmp_path, inputs):
    rc, out, log = _fake_job(tmp_path, inputs, mode="slow-start", signal_batch=True)
    assert rc == 0 and log.splitlines()[1:] == ["stopping", "requeue 1234"], out


def test_job_script_requeues_when_the_tasks_alone_were_signalled(tmp_path, inputs):
    rc, out, log = _fake_job(tmp_path, inputs, mode="preempt", signal_task=True)
    assert rc == 0 and log.splitlines()[1:] == ["stopping", "requeue 1234"], out


def test_job_script_does_not_requeue_a_crash_or_past_max_restarts(tmp_path, inputs):
    rc, out, log = _fake_job(tmp_path, inputs, mode="crash")
    assert rc == 1 and "requeue" not in log and "training failed (exit 1)" in out
    rc, out, log = _fake_job(tmp_path, inputs, mode="preempt", signal_batch=True, restart=3)
    assert rc == 75 and "requeue" not in log and "already restarted 3 times" in out


def test_job_script_prefers_the_run_checkpoint_over_a_warm_start(tmp_path, inputs):
    rc, out, log = _fake_job(tmp_path, inputs, mode="finish", resume="/elsewhere/step_00000100")
    assert rc == 0 and "train.resume=/elsewhere/step_00000100" in log
    (tmp_path / "fake.log").unlink()
    rc, out, log = _fake_job(tmp_path, inputs, mode="finish", resume="/elsewhere/step_00000100", checkpoint=True)
    assert rc == 0 and "train.resume=latest" in log and "/elsewhere" not in log


# ---------------------------------------------------------------- what the job script runs, with any run directory

# Stands in for the trainer's python: records its argv as JSON, then runs the real python on the same program
# (the recorded entry point, or `-m contrastive.cli`) with --help, which imports whichever contrastive that
# program finds first.
ARGV_PYTHON = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
program = sys.argv[1:3] if sys.argv[1] == "-m" else sys.argv[1:2]
os.execv({sys.executable!r}, [{sys.executable!r}, *program, "--help"])
"""


def _run_job_script(tmp_path, script: Path, *, cwd: Path, **env) -> tuple[int, str, list[dict]]:
    """Run a rendered job script under fake srun/scontrol, its python being ARGV_PYTHON (bin/argv-python)."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "argv.log"
    proc = subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                                   SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
                                   SLURM_NTASKS="1", CONTRASTIVE_SLURM_POLL_S="0.2", **env))
    started = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, started


def _stubs(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("argv-python", ARGV_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _sbatch_words(line: str) -> list[str]:
    """The words sbatch reads from one #SBATCH line: a port of _get_argument in Slurm's src/sbatch/opt.c (22.05-
    24.x): a backslash escapes the next character (inside quotes too), ' and " quote, an unquoted # ends the line."""
    words, word, quote, escaped, started = [], [], "", False, False
    for ch in line.removeprefix("#SBATCH"):
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started or word:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    assert not quote, f"sbatch: unmatched {quote} in {line!r}"
    return words + (["".join(word)] if started or word else [])


@pytest.mark.parametrize("out", ["runs/a;date>INJECTED;#", "runs/exp(1)", "runs/my run (2)",
                                 "runs/it's $HOME `touch INJECTED` \"q\" a:b&c|d"])
def test_a_run_directory_is_data_never_shell_code(tmp_path, inputs, monkeypatch, out):
    """The --out of the issue (`runs/a;date>INJECTED;#` ran `date` on the compute node; `runs/exp(1)` made a script
    bash rejects), spaces and parentheses, and every other shell character: the rendered script parses, sbatch
    reads its #SBATCH lines as meant, and the trainer gets the run directory as one intact argument."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `contrastive slurm submit` run here: the job's working directory
    monkeypatch.setattr(slurm, "query_cluster", lambda: None)
    bin_dir = _stubs(tmp_path)
    req = slurm.JobRequest(config=REPO / "configs" / "demo.yaml", overrides=[*inputs, "train.batch_size=64"],
                           run_dir=Path(out), python=str(bin_dir / "argv-python"))
    script = slurm.submit(req, dry_run=True).script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    run_dir = work / out
    sbatch = dict(word.partition("=")[::2] for line in script.splitlines() if line.startswith("#SBATCH")
                  for word in _sbatch_words(line))
    assert sbatch["--output"] == f"{run_dir}/logs/slurm-%j.out" and sbatch["--chdir"] == str(work)
    assert sbatch["--job-name"] == "contrastive-" + "".join(c if c.isalnum() or c in "._+-" else "_"
                                                             for c in run_dir.name)

    # Run it (as its first start on the node would) with the code a submission records.
    code_dir = run_dir / "code" / slurm.code_digest(slurm.code_files(REPO))
    slurm.record_code(code_dir, files=slurm.code_files(REPO), version=slurm.code_version(REPO), source=REPO)
    (tmp_path / "job.sh").write_text(script)
    rc, output, started = _run_job_script(tmp_path, tmp_path / "job.sh", cwd=work)
    assert rc == 0 and "training finished" in output, output
    assert started == [{"argv": [str(code_dir / slurm.CODE_MAIN), "train", "--config",
                                 str(run_dir / "slurm" / "config.yaml"), "--out", str(run_dir), "train.resume=latest"],
                        "cwd": str(work)}]
    assert "usage: contrastive" in output  # the recorded entry point ran (with --help, see ARGV_PYTHON)
    assert not list(tmp_path.rglob("INJECTED"))
    assert "job=1234 run=0 nodes=node1" in (run_dir / "slurm" / "runs.log").read_text()
    assert (run_dir / "logs" / "job-1234-run0").is_dir()


def test_a_requeued_job_runs_the_code_it_was_submitted_with(tmp_path, inputs, monkeypatch, cluster):
    """Submit from a checkout (installed editable: PYTHONPATH here), then change the checkout: the job, as any
    requeue of it would, still runs the code recorded at submission."""
    checkout = tmp_path / "checkout"
    for rel, src in slurm.code_files(REPO).items():
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, checkout / rel)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "submitted")
    submitted = git("rev-parse", "HEAD")
    monkeypatch.setattr(slurm, "REPO", checkout)
    monkeypatch.setattr(slurm, "query_cluster", lambda: cluster)
    monkeypatch.setattr(slurm, "_sbatch", lambda args, *, script: "Job 9 to start" if "--test-only" in args else "77")
    bin_dir = _stubs(tmp_path)
    run = tmp_path / "run"
    sub = slurm.submit(_request(checkout, inputs, run_dir=run, python=str(bin_dir / "argv-python")))
    assert sub.job_id == "77"

    # The checkout moves on (a pull, an edit): its cli now fails on import.
    (checkout / "contrastive" / "cli.py").write_text('raise SystemExit("ran the checkout\'s code")\n')
    git("commit", "-qam", "later")
    env = {"PYTHONPATH": str(checkout)}
    # Without the recorded copy, `python -m contrastive.cli` (what the job ran before) would run the checkout's.
    plain = subprocess.run([sys.executable, "-m", "contrastive.cli", "--help"], cwd=checkout, capture_output=True,
                           text=True, env=dict(os.environ, **env))
    assert plain.returncode == 1 and "ran the checkout's code" in plain.stderr

    rc, output, started = _run_job_script(tmp_path, run / "slurm" / "job.sbatch", cwd=checkout, **env)
    assert rc == 0 and "ran the checkout's code" not in output and "usage: contrastive" in output, output
    code_dir = Path(started[0]["argv"][0]).parent
    assert code_dir.parent == run / "code"
    assert (code_dir / "contrastive" / "cli.py").read_bytes() == (REPO / "contrastive" / "cli.py").read_bytes()
    assert json.loads((code_dir / "VERSION.json").read_text())["commit"] == submitted
    assert f"commit={submitted} code={code_dir}" in (run / "slurm" / "runs.log").read_text()
    # A resubmission of the changed code records a second copy beside the first, which it leaves alone.
    (checkout / "contrastive" / "cli.py").write_bytes((REPO / "contrastive" / "cli.py").read_bytes() + b"\n# later\n")
    slurm.submit(_request(checkout, inputs, run_dir=run, python=str(bin_dir / "argv-python")))
    assert len(list((run / "code").iterdir())) == 2 and (code_dir / "VERSION.json").is_file()
