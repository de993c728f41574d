"""The other PEFT methods, each through a real run on one rank in this process. (Offload and activation
checkpointing are checked against the reference in test_train_distributed.py.)"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import INLINE, train
from ftcluster.observe.track import read_metrics
from reference import reference_run


def losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.mark.parametrize("method, extra", [
    ("dora", []),
    ("prompt", ["data.packing=false"]),
    ("prefix", ["data.packing=false"]),
])
def test_peft_methods_train_and_export(tmp_path, method, extra):
    # One rank in this process: what is checked is the method's training and export, not placement.
    run = tmp_path / method
    train(run, *INLINE, f"peft={method}", "strategy=zero2", "trainer.micro_batch_per_device=4",
          "trainer.max_steps=4", "optim.lr=3e-2", *extra)
    assert len(losses(run)) == 4
    evals = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]  # held-out loss, before and after
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(run / "init_model")
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    # DoRA merges into the weights; prompt and prefix tuning leave the base weights as they were.
    assert changed == (method == "dora")


def test_one_rank_without_zero_reduces_no_gradients_and_matches_the_reference(tmp_path):
    """With one data-parallel rank and fp32 gradients DeepSpeed's gradient all-reduce is skipped (it would
    all-reduce across that one rank): no time in collectives, with 4 accumulation micro-batches and clipping,
    and the same losses and gradient norms as the plain-torch reference."""
    run = tmp_path / "one_rank"
    train(run, *INLINE, "strategy=zero0", "strategy.precision=fp32", "strategy.gradient_clipping=0.5",
          "trainer.max_steps=4", "trainer.profile_comms=true")
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["comm_time_s"] for r in rows] == [0.0] * 4
    reference = reference_run(run)
    assert [r["loss"] for r in rows] == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
    assert [r["grad_norm"] for r in rows] == pytest.approx(reference.grad_norms, rel=1e-4)


# ---- NCCL and ftcluster's hang diagnosis: which fires first -------------------------------------------------

def test_nccl_workers_wait_longer_than_the_hang_diagnosis(tmp_path):
    """Ray's default (abort at the process-group timeout) would kill a hung rank before ftcluster names the
    hang: the workers get NCCL settings that leave the diagnosis time to run first."""
    from ftcluster.config import compose
    from ftcluster.launch.worker_env import worker_env
    from ftcluster.observe.placement import REPORT_DIR_ENV, nccl_timeout_s

    cfg = compose(["model=tiny", "launcher.collective_timeout_s=600", f"output_dir={tmp_path}"])
    env = worker_env(cfg, "nccl")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # set by us, so Ray leaves it alone
    assert env[REPORT_DIR_ENV] == str(tmp_path)
    assert nccl_timeout_s(600) > 600 and int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > nccl_timeout_s(600)
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and env["TORCH_FR_DUMP_TEMP_FILE"].startswith(str(tmp_path))
    assert set(worker_env(cfg, "gloo")) == {REPORT_DIR_ENV}  # gloo raises in Python: the worker diagnoses itself


def test_a_rank_without_progress_writes_its_hang_report_before_nccl_would_abort(tmp_path):
    import time

    from ftcluster.launch.ray import hang_reports
    from ftcluster.observe.watchdog import Watchdog

    placement = [{"rank": r, "node": f"node{r}", "ip": "10.0.0.1", "pid": 100 + r} for r in range(2)]
    started = time.time()
    watchdog = Watchdog(placement, timeout_s=1, report_dir=str(tmp_path))
    try:
        watchdog.beat(4)
        deadline = time.time() + 10
        while not (tmp_path / "hang-rank-0.txt").exists() and time.time() < deadline:
            time.sleep(0.1)
    finally:
        watchdog.close()
    report = (tmp_path / "hang-rank-0.txt").read_text()
    assert "launcher.collective_timeout_s=1" in report and "step 5" in report, report
    assert hang_reports(str(tmp_path), since=started) == [report.strip()]
    assert hang_reports(str(tmp_path), since=time.time() + 60) == []  # an older launch's report is not this one's


def test_zero3_generation_gathers_the_whole_model_once_only_when_it_fits():
    from ftcluster.eval.generate import fits_whole, gathered_bytes

    weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
    weight.ds_numel = 1_000_000  # a ZeRO-3 partitioned parameter: empty here, its full size in ds_numel
    assert gathered_bytes([weight, torch.nn.Parameter(torch.zeros(10))]) == 2_000_000 + 40
    assert fits_whole(2 * 2**30, free_bytes=80 * 2**30)  # a 1B model on an 80 GB GPU: gathered once
    assert not fits_whole(140 * 2**30, free_bytes=80 * 2**30)  # 70B in bf16: per-layer gathering stays
