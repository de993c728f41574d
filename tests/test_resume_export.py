"""Exact resume (across an epoch boundary), atomic checkpoints, and the export round trip."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import RESUMABLE, cli, train
from ftcluster.train import checkpoint, checkpoint_io
from ftcluster.observe.track import read_metrics


def rows(run, key):
    return [(r["step"], r[key]) for r in read_metrics(run) if key in r]


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(zero3_run, tmp_path):
    whole, part = zero3_run, tmp_path / "part"
    train(part, *RESUMABLE, "trainer.save_every_steps=3", "trainer.stop_after_steps=5")
    assert [p.name for p in checkpoint.complete_checkpoints(part)] == ["step-3", "step-5"]
    assert not (part / "final").exists()
    train(part, *RESUMABLE, "trainer.save_every_steps=3", "resume=auto")

    epochs = {e for _, e in rows(whole, "epoch")}
    assert len(epochs) >= 2, f"the run should cross an epoch boundary, saw epochs {epochs}"
    assert rows(part, "loss") == rows(whole, "loss")  # bit-identical, steps 1..8, each once
    assert rows(part, "eval_loss") == rows(whole, "eval_loss")
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_export_round_trip_gives_the_same_eval_loss(zero2_run, tmp_path):
    from ftcluster.data.loader import eval_batches
    from ftcluster.data.rows import read_rows
    from ftcluster.stages.sft import token_loss_sum

    run, template = zero2_run  # its data.chat_template: ChatML without the default system prompt
    logged = rows(run, "eval_loss")[-1]
    assert logged[0] == 6

    from transformers import AutoTokenizer

    # the run's chat template travels with the model
    assert AutoTokenizer.from_pretrained(run / "final").chat_template == template.read_text()
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    eval_rows = read_rows(run / "data" / "eval")
    total = tokens = 0.0
    with torch.no_grad():
        for batch in eval_batches(eval_rows, 4, 0, 1, 0, True):
            total += token_loss_sum(model, batch).item()
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    assert total / tokens == pytest.approx(logged[1], rel=1e-5)

    # `ftcluster export` from the last checkpoint rebuilds the same weights offline.
    result = cli("export", str(run / "checkpoints" / "step-6"), "--out", str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr
    assert AutoTokenizer.from_pretrained(tmp_path / "exported").chat_template == template.read_text()
    a, b = load_file(run / "final" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class FailingEngine:
    """Writes part of a checkpoint, then dies, as a process killed mid-save would."""

    def save_checkpoint(self, save_dir, tag, exclude_frozen_parameters):
        (checkpoint.Path(save_dir) / tag).mkdir(parents=True)
        (checkpoint.Path(save_dir) / tag / "partial.pt").write_bytes(b"half")
        raise OSError("disk full")


class WritingEngine:
    def save_checkpoint(self, save_dir, tag, exclude_frozen_parameters):
        (checkpoint.Path(save_dir) / tag).mkdir(parents=True)
        (checkpoint.Path(save_dir) / tag / "weights.pt").write_bytes(b"ok")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    checkpoint_io.save(WritingEngine(), tmp_path, 4, {"data": {}}, keep_last=2, exclude_frozen=False)
    with pytest.raises(OSError):
        checkpoint_io.save(FailingEngine(), tmp_path, 8, {"data": {}}, keep_last=2, exclude_frozen=False)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-4"
    assert (tmp_path / "checkpoints" / "step-4" / "state" / "weights.pt").read_bytes() == b"ok"
    # a folder named like a checkpoint but never completed is not picked either
    (tmp_path / "checkpoints" / "step-12").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-4"
    # a failed save at the same step as a good one does not destroy the good one
    with pytest.raises(OSError):
        checkpoint_io.save(FailingEngine(), tmp_path, 4, {"data": {}}, keep_last=2, exclude_frozen=False)
    assert (tmp_path / "checkpoints" / "step-4" / "state" / "weights.pt").read_bytes() == b"ok"


def test_keep_last_prunes_oldest(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoint_io.save(WritingEngine(), tmp_path, step, {"data": {}}, keep_last=2, exclude_frozen=False)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-6", "step-8"]
    assert checkpoint.read_state(tmp_path / "checkpoints" / "step-8")["step"] == 8


def _quantized_like(state_dict: dict, targets: list[str]) -> dict:
    """A QLoRA training's state dict without bitsandbytes: each adapted layer's frozen base weight packed two
    4-bit values per uint8 byte, plus the quantization state bitsandbytes serializes beside it."""
    shaped = {}
    for key, value in state_dict.items():
        if key.endswith(".base_layer.weight") and key.split(".")[-3] in targets:
            shaped[key] = torch.zeros(value.numel() // 2, 1, dtype=torch.uint8)
            for extra in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
                shaped[f"{key}.{extra}"] = torch.ones(4)
            shaped[f"{key}.quant_state.bitsandbytes__nf4"] = torch.zeros(16, dtype=torch.uint8)
        else:
            shaped[key] = value
    return shaped


def test_qlora_export_merges_the_adapter_into_a_plain_base(tmp_path):
    """The final export of a QLoRA run: the 4-bit base's packed weights and quant state are not loaded; the base
    is reloaded unquantized and the trained adapter merged into it, so final/ holds plain float weights."""
    from peft import get_peft_model

    from ftcluster.config import compose
    from ftcluster.train.bundled import resolve_model_path
    from ftcluster.train.export import write_final
    from ftcluster.train.model import peft_config
    from ftcluster.train.random_init import materialize_random_init

    cfg = compose(["model=tiny", "peft=qlora", "strategy.precision=fp32"])
    model_dir = materialize_random_init(resolve_model_path(cfg.model.path), tmp_path / "base", seed=0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trained = get_peft_model(base, peft_config(cfg, base))
    torch.manual_seed(1)
    for name, param in trained.named_parameters():
        if "lora_B" in name:  # B starts at zero: a trained adapter has moved it
            param.data.normal_(0, 0.1)
    state = _quantized_like(trained.state_dict(), list(cfg.peft.target_modules))
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in state)

    final = write_final(state, cfg, model_dir, tmp_path / "final")

    merged = load_file(final / "model.safetensors")
    assert all(v.is_floating_point() for v in merged.values())
    assert not any("absmax" in k or "quant" in k or "lora" in k for k in merged)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               peft_config(cfg, base))
    reference.load_state_dict({k: v for k, v in trained.state_dict().items() if "lora" in k}, strict=False)
    want = reference.merge_and_unload().state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged[q], want[q], atol=1e-6)
    assert not torch.allclose(merged[q], load_file(next(Path(model_dir).glob("*.safetensors")))[q])
    assert (final / "adapter" / "adapter_config.json").is_file()
