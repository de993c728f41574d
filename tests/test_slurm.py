"""launcher=slurm against a real SLURM cluster: slurmctld and two slurmd emulating node1 and node2 on
this machine, brought up by slurm/local/up.sh (root; it installs Debian's Slurm when missing): the `slurm`
fixture in conftest.py."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LONG, TINY, assert_same_weights, cli, last_step, losses, ranks_held
from reference import reference_run
from ftcluster.launch.submit import hydra_quote

ROOT = Path(__file__).resolve().parent.parent
# Spaces, both quotes, `$`, backticks and a backslash: all must reach the job unchanged.
PROMPT = """It's "quoted" $HOME `not run` \\ back"""


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_until(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def main_in_process(capsys, *args):
    """`ftcluster ...` through the CLI's main() in this process: what a refusal says, without a process start."""
    from types import SimpleNamespace

    from ftcluster.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.mark.slow
def test_two_nodes_zero3_match_the_single_process_reference(slurm, tmp_path):
    args = ["strategy=zero3", "trainer.max_steps=4", f"data.system_prompt={hydra_quote(PROMPT)}"]
    run = tmp_path / "slurm"
    result = cli("train", *TINY, *args, "launcher=slurm", "launcher.nodes=2", f"output_dir={run}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"SLURM job \d+: COMPLETED", result.stdout)

    assert sorted(losses(run)) == [1, 2, 3, 4]
    # The plain-torch loop over the same prepared rows (with the system prompt) and initial weights.
    expected = reference_run(run).losses
    assert [losses(run)[step] for step in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    from ftcluster.config import load_run_config

    assert load_run_config(run / "config.yaml").data.system_prompt == PROMPT
    import json

    placement = json.loads((run / "workers.json").read_text())
    assert [(w["rank"], w["node"]) for w in placement] == [(0, "node1"), (1, "node2")]  # rank 0 on the head


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_to_the_uninterrupted_result(slurm, uninterrupted, tmp_path):
    """Plain sbatch on the template, as a user may: a hard requeue (scontrol requeue) resumes from the
    newest periodic checkpoint; SIGUSR1 (what --signal sends before a time limit) checkpoints, exits 75
    and requeues. The third attempt completes with the weights of an uninterrupted run."""
    run = tmp_path / "run"
    run.mkdir()
    overrides = [*TINY, *LONG, "launcher=slurm", f"output_dir={run}"]
    submitted = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={run}/slurm.log",
                                ROOT / "slurm/ftcluster.sbatch", *overrides], capture_output=True, text=True,
                               check=True, cwd=tmp_path, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                                                    f"{os.environ['PATH']}"})
    job = submitted.stdout.strip()
    log = run / "slurm.log"
    try:
        wait_until(lambda: last_step(run) >= 4, "attempt 0 to train 4 steps")
        subprocess.run(["scontrol", "requeue", job], check=True)
        wait_until(lambda: "attempt 1" in log.read_text(), "attempt 1 to start")
        wait_until(lambda: "resumed from" in log.read_text() and last_step(run) >= 9, "attempt 1 to train")
        with ranks_held(run):
            subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        wait_until(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", 600)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert "attempt 2" in text and "requeueing" in text, text[-3000:]
    assert len(re.findall(r"resumed from \S+/checkpoints/step-\d+", text)) >= 2
    assert losses(run) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert_same_weights(run / "final", uninterrupted / "final")


@pytest.mark.slow
def test_job_that_fails_inside_reports_exit_code_and_log_tail(slurm, tmp_path):
    result = cli("train", *TINY, "launcher=slurm", "launcher.setup=['echo preparing the node; exit 3']",
                 f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 3, result.stderr[-2000:]
    assert re.search(r"SLURM job \d+ ended FAILED with exit code 3", result.stderr)
    assert "preparing the node" in result.stderr.split("last lines of")[-1]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, key, says", [
    (["launcher.partition=nope"], "launcher.partition", "available: debug"),
    (["launcher.nodes=3", "launcher.workers=3", "trainer.global_batch=6"], "launcher.nodes", "partition debug has 2"),
    (["launcher.nodes=2", "launcher.gpus_per_node=1"], "launcher.gpus_per_node", "at most 0"),
    (["launcher.account=my account"], "launcher.account", "cannot go on an #SBATCH line"),
])
def test_impossible_requests_are_refused_before_submission(slurm, capsys, tmp_path, overrides, key, says):
    result = main_in_process(capsys, "train", *TINY, "launcher=slurm", *overrides, f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert f"config key '{key}'" in result.stderr and says in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_no_sbatch_on_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    result = main_in_process(capsys, "train", *TINY, "launcher=slurm", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "missing: sbatch" in result.stderr and "slurm/local/up.sh" in result.stderr


def test_inside_a_job_an_unreachable_ray_head_fails_fast_naming_it(capsys, monkeypatch, tmp_path):
    """The job side (FTCLUSTER_RAY_ADDRESS, set by slurm/ftcluster.sbatch) when its Ray head is gone: one
    error naming the address instead of a hang. No SLURM cluster needed."""
    from ftcluster.util.net import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("FTCLUSTER_RAY_ADDRESS", address)
    started = time.time()
    result = main_in_process(capsys, "train", *TINY, "launcher=slurm", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and time.time() - started < 60
    assert address in result.stderr and "nothing answers" in result.stderr, result.stderr


def test_dry_run_script_carries_every_override_byte_for_byte(capsys, tmp_path):
    overrides = [*TINY, "launcher=slurm", "launcher.nodes=2", f"data.system_prompt={hydra_quote(PROMPT)}",
                 "launcher.setup=['module load cuda/12.4', 'source $HOME/venv/bin/activate']"]
    result = main_in_process(capsys, "train", *overrides, f"output_dir={tmp_path / 'run'}", "--dry-run")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=B:USR1@120" in script
    assert "\nmodule load cuda/12.4\nsource $HOME/venv/bin/activate\n" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    set_line = next(line for line in script.splitlines() if line.startswith("set -- "))
    parsed = subprocess.run(["bash", "-c", set_line + '\nprintf "%s\\0" "$@"'], capture_output=True, text=True,
                            check=True).stdout.split("\0")[:-1]
    assert parsed == [*overrides, f"output_dir={tmp_path / 'run'}", f"output_dir={tmp_path / 'run'}"]
    assert not (tmp_path / "run").exists()


def test_override_hydra_cannot_parse_is_refused_before_submission(capsys, tmp_path):
    result = main_in_process(capsys, "train", *TINY, "launcher=slurm", "data.system_prompt=it's", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "data.system_prompt=it's" in result.stderr and "quote" in result.stderr, result.stderr


def _rendered(capsys, tmp_path, *overrides) -> str:
    result = main_in_process(capsys, "train", *TINY, "launcher=slurm", *overrides, f"output_dir={tmp_path / 'run'}",
                             "--dry-run")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_job_asks_for_all_of_each_nodes_memory_unless_told(capsys, tmp_path):
    """ZeRO 0-2 ranks each load the whole model into host memory at start: SLURM's default share is too small."""
    assert "\n#SBATCH --mem=0\n" in _rendered(capsys, tmp_path)
    assert "\n#SBATCH --mem=256G\n" in _rendered(capsys, tmp_path, "launcher.mem=256G")
    assert "--mem" not in _rendered(capsys, tmp_path, "launcher.mem=null")
    refused = main_in_process(capsys, "train", *TINY, "launcher=slurm", "launcher.mem=lots",
                              f"output_dir={tmp_path / 'run'}", "--dry-run")
    assert refused.returncode == 2 and "launcher.mem" in refused.stderr, refused.stderr


def _driver_command(script: str) -> list[str]:
    """What the script runs the driver with, evaluated by bash from the rendered lines themselves."""
    lines = script.splitlines()
    setup = [line for line in lines if line.startswith(("SRUN_CONTAINER=", "EXEC="))]
    start = next(i for i, line in enumerate(lines) if line.startswith("driver_cmd="))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith('"${driver_cmd[@]}"'))
    program = "\n".join(["SRUN_CONTAINER=() EXEC=()", *setup, "head_node=node1", *lines[start:end],
                         'for arg in "${driver_cmd[@]}"; do printf "%s\\0" "$arg"; done'])
    return subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout.split("\0")[:-1]


def test_with_pyxis_the_driver_runs_inside_the_container_too(capsys, tmp_path):
    pyxis = _rendered(capsys, tmp_path, "launcher.container_image='nvcr.io#nvidia/pytorch:24.05-py3'",
                      "launcher.container_mounts=['/data:/data']")
    subprocess.run(["bash", "-n"], input=pyxis, text=True, check=True)
    assert _driver_command(pyxis) == ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", "node1",
                                      "--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
                                      "--container-mounts=/data:/data"]
    apptainer = _rendered(capsys, tmp_path, "launcher.container_image=/img/ft.sif", "launcher.container_runtime=apptainer")
    assert _driver_command(apptainer) == ["apptainer", "exec", "--nv", "/img/ft.sif"]
    assert _driver_command(_rendered(capsys, tmp_path)) == []  # no container: the job's own environment


def test_login_node_submission_leaves_device_checks_to_the_allocation(capsys, monkeypatch, tmp_path):
    """flash-attn is not installed here, as on a login node: the submission goes through, and the job's own
    validate() (FTCLUSTER_RAY_ADDRESS set inside the allocation) checks it where the GPUs are."""
    from ftcluster.config import compose, validate
    from ftcluster.errors import ConfigError

    flash = ["model.attn_implementation=flash_attention_2", "peft=qlora"]
    script = _rendered(capsys, tmp_path, *flash)
    assert "strategy.precision" not in script  # auto travels as auto: resolved in the allocation
    cfg = compose([*TINY, "launcher=slurm", *flash])
    validate(cfg, check_paths=False)
    assert cfg.strategy.precision == "auto"
    monkeypatch.setenv("FTCLUSTER_RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(ConfigError, match="peft.method|model.attn_implementation"):
        validate(compose([*TINY, "launcher=slurm", *flash]), check_paths=False)
