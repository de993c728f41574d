"""The other PEFT methods, each through a real run on one rank in this process. (Offload and activation
checkpointing are checked against the reference in test_train_distributed.py.)"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import INLINE, train
from ftcluster.observe.track import read_metrics


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
