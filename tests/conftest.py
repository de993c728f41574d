"""The environment every test runs in, and the fixtures. Constants and helpers that test modules import
are in helpers.py."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import LONG, PAIRS, PLAIN_CHATML, RESUMABLE, train  # noqa: E402  (after the environment)


# ==== Shared runs: several tests read each of these ======================================================
# Each trains once per session, on first use, and the tests that read it check different things about the
# same run; a test run alone still trains what it reads. (Runs shared within one module only are that
# module's own fixtures: tiny_run in test_eval.py, grpo_run in test_rl.py, asha_sweep in test_sweep.py,
# smoke_suite in test_bench.py, finished_job in test_ray_jobs.py.)

@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The LONG run (ZeRO-2, 2 workers, 40 steps) without interruption: what every interrupted and resumed
    run must reproduce. Read by test_fault_tolerance.py::test_sigkilled_worker_is_restarted_from_the_newest_
    checkpoint and test_slurm.py::test_preempted_job_requeues_and_resumes_to_the_uninterrupted_result."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, *LONG)
    return out


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory) -> Path:
    """One uninterrupted RESUMABLE run (ZeRO-3, 2 workers, across an epoch boundary). Read by
    test_resume_export.py::test_resume_continues_exactly_like_an_uninterrupted_run (what the resumed run
    must reproduce) and test_train_distributed.py::test_zero3_matches_single_process_reference."""
    out = tmp_path_factory.mktemp("zero3") / "whole"
    train(out, *RESUMABLE)
    return out


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory) -> tuple[Path, Path]:
    """One ZeRO-2 SFT run on 2 workers: ChatML without the default system prompt as data.chat_template, wandb
    (offline) and TensorBoard on. Returns (output_dir, template file). Read by test_train_distributed.py::
    test_zero2_matches_single_process_reference and ::test_manifest_config_and_trackers_are_written, and
    test_resume_export.py::test_export_round_trip_gives_the_same_eval_loss."""
    root = tmp_path_factory.mktemp("zero2")
    template = root / "plain_chatml.jinja"
    template.write_text(PLAIN_CHATML)
    train(root / "run", "strategy=zero2", "trainer.max_steps=6", f"data.chat_template={template}", "tracking=wandb",
          "tracking.tensorboard=true")
    return root / "run", template


@pytest.fixture(scope="session")
def reward_model_run(tmp_path_factory) -> Path:
    """A reward model trained on the bundled pairs (stage=rm, ZeRO-2, 2 workers). Read by
    test_preference.py::test_reward_model_learns_and_final_scores_text, and the reward model of
    test_rl.py::test_ppo_with_a_reward_model_a_critic_and_a_reference_group."""
    out = tmp_path_factory.mktemp("reward_model")
    train(out, "stage=rm", *PAIRS, "strategy=zero2", "trainer.max_steps=12", "trainer.eval_every_steps=12",
          "optim.lr=3e-3")
    return out


# ==== Clusters ===========================================================================================

@pytest.fixture(scope="module")
def slurm():
    """The local SLURM cluster (slurm/local/up.sh, root): brought up (and torn down) here unless one is already
    running."""
    root = Path(__file__).resolve().parent.parent
    running = shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    if not running:
        if os.geteuid() != 0:
            pytest.skip("the SLURM tests bring up a local cluster with slurm/local/up.sh, which needs root")
        subprocess.run([root / "slurm/local/up.sh"], check=True, timeout=900)
    yield
    if not running:
        subprocess.run([root / "slurm/local/down.sh"], check=True, timeout=120)


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
