"""Precision: strategy.precision=auto, the DeepSpeed config it produces (bf16, fp32 gradient accumulation,
overlap_comm, TF32), the refusals, and a bf16 run of the tiny model on CPU against the fp32 one."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import INLINE, losses, train
from ftcluster.config import compose, derive, validate
from ftcluster.config.precision import precision_for
from ftcluster.errors import ConfigError
from ftcluster.train.engine import deepspeed_config, enable_tf32

TINY_CPU = ["model=tiny", "data=json_extract", "peft=none"]


@pytest.fixture
def cuda(monkeypatch):
    """What torch reports on a bf16-capable GPU machine (the code under test only asks; nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr("ftcluster.util.hardware.gpu_device_nodes", lambda: True)  # /dev/nvidia0 and so on


def test_auto_is_bf16_on_a_bf16_gpu_and_fp32_elsewhere():
    assert precision_for("auto", on_gpu=True) == "bf16"
    assert precision_for("auto", on_gpu=True, bf16_supported=False) == "fp32"  # V100, T4: never fp16 unasked
    assert precision_for("auto", on_gpu=False) == "fp32"
    assert precision_for("fp16", on_gpu=False) == "fp16"


def test_validate_resolves_auto_to_fp32_on_this_cpu_machine():
    cfg = compose(TINY_CPU)
    assert cfg.strategy.precision == "auto"
    validate(cfg, check_paths=False)
    assert cfg.strategy.precision == "fp32"
    assert deepspeed_config(cfg, derive(cfg))["bf16"]["enabled"] is False


def test_validate_on_a_machine_without_gpu_devices_does_not_import_torch():
    """The driver validates before it starts anything (a cluster, the ranks): torch's import (1-2 s) would
    delay them all."""
    from ftcluster.util.hardware import gpu_device_nodes

    if gpu_device_nodes():
        pytest.skip("this machine shows a GPU device: torch is asked")
    probe = ("import sys; from ftcluster.config import compose, validate; cfg = compose(['model=tiny', "
             "'data=json_extract', 'peft=none', 'launcher=local', 'launcher.workers=2']); validate(cfg); "
             "print(cfg.strategy.precision, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["fp32", "False"], result.stderr[-2000:]


def test_validate_resolves_auto_to_bf16_where_cuda_is(cuda):
    cfg = compose([*TINY_CPU, "launcher.workers=1"])
    validate(cfg, check_paths=False)
    assert cfg.strategy.precision == "bf16"


def test_flash_attention_with_fp32_is_refused_naming_both_keys():
    cfg = compose([*TINY_CPU, "model.attn_implementation=flash_attention_2", "strategy.precision=fp32"])
    with pytest.raises(ConfigError) as refused:
        validate(cfg, check_paths=False)
    assert "model.attn_implementation" in str(refused.value) and "strategy.precision" in str(refused.value)


def test_bf16_without_zero_and_with_accumulation_is_refused():
    cfg = compose([*TINY_CPU, "strategy=zero0", "strategy.precision=bf16", "trainer.micro_batch_per_device=2",
                   "trainer.global_batch=8", "launcher.workers=1"])
    with pytest.raises(ConfigError, match="strategy.zero_stage"):
        validate(cfg, check_paths=False)


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_bf16_accumulates_gradients_in_fp32(strategy):
    cfg = compose([*TINY_CPU, f"strategy={strategy}", "strategy.precision=bf16"])
    ds = deepspeed_config(cfg, derive(cfg))
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = compose([*TINY_CPU, f"strategy={strategy}", "strategy.precision=fp32"])
    assert "data_types" not in deepspeed_config(fp32, derive(fp32))


def test_overlap_comm_is_on_for_zero2_and_3_on_cuda_only(cuda):
    on = {s: deepspeed_config(c, derive(c))["zero_optimization"].get("overlap_comm")
          for s in ("zero1", "zero2", "zero3") for c in [compose([*TINY_CPU, f"strategy={s}"])]}
    assert on == {"zero1": False, "zero2": True, "zero3": True}


def test_overlap_comm_stays_off_on_cpu():
    cfg = compose([*TINY_CPU, "strategy=zero3"])
    assert deepspeed_config(cfg, derive(cfg))["zero_optimization"]["overlap_comm"] is False


def test_tf32_is_enabled_on_cuda(cuda):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        enable_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_loss_of_a_bf16_model_is_summed_in_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftcluster.objectives.cross_entropy import token_loss_sum
    from ftcluster.train.bundled import resolve_model_path
    from ftcluster.train.random_init import materialize_random_init

    cfg = compose(TINY_CPU)
    folder = materialize_random_init(resolve_model_path(cfg.model.path), tmp_path / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(16).repeat(2, 1)}
    assert token_loss_sum(model, batch).dtype == torch.float32


@pytest.mark.slow
def test_bf16_run_on_cpu_trains_close_to_the_fp32_run(tmp_path):
    """A few ZeRO-2 steps with 4 micro-batches each: bf16 weights and activations, fp32 master weights and
    fp32 gradient accumulation. The config written to the run says bf16; losses stay finite and near fp32's."""
    common = [*INLINE, "strategy=zero2", "trainer.max_steps=3", "trainer.micro_batch_per_device=2",
              "trainer.global_batch=8", "optim.lr=1e-3"]
    train(tmp_path / "fp32", *common, "strategy.precision=fp32")
    train(tmp_path / "bf16", *common, "strategy.precision=bf16")
    from ftcluster.config import load_run_config

    assert load_run_config(tmp_path / "bf16" / "config.yaml").strategy.precision == "bf16"
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["precision"] == "bf16"
    cfg = load_run_config(tmp_path / "bf16" / "config.yaml")
    ds = deepspeed_config(cfg, derive(cfg))
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    full, half = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert sorted(half) == [1, 2, 3]
    for step in half:
        assert half[step] == pytest.approx(full[step], rel=0.03), (step, half, full)
