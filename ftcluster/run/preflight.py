"""The checks of `ftcluster train` that need more than the config: the resume policy against output_dir,
the reward of an RL stage, the evaluation references. All run before any cluster starts; the submitting
side of a Ray Job or SLURM job runs them too, before the job waits in a queue."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig
from transformers import AutoConfig

from ftcluster.config import Derived
from ftcluster.errors import ConfigError
from ftcluster.eval.scores import check_references
from ftcluster.rewards import load_reward_fn
from ftcluster.train import checkpoint
from ftcluster.train.model import load_tokenizer


def check_rewards(cfg: DictConfig) -> None:
    """The reward function imports, or the reward model is a sequence classifier whose tokenizer fits it
    and can render a conversation: checked before any actor starts."""
    rl = cfg.stage.rl
    if rl.reward_fn:
        load_reward_fn(rl.reward_fn)
        return
    folder = Path(rl.reward_model)
    if not (folder / "config.json").is_file():
        raise ConfigError("stage.rl.reward_model", f"{folder} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    if not any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
        raise ConfigError("stage.rl.reward_model", f"{folder} holds {config.architectures}, not a sequence "
                                                   f"classifier; train one with stage=rm and use its final/")
    tokenizer = load_tokenizer(str(folder))
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError("stage.rl.reward_model", f"the tokenizer in {folder} has {len(tokenizer)} tokens but its "
                                                   f"model only {vocab} embeddings: they do not belong together; "
                                                   f"use the tokenizer the reward model was trained with")
    if not tokenizer.chat_template:
        raise ConfigError("stage.rl.reward_model", f"the tokenizer in {folder} has no chat template, so the "
                                                   f"policy's conversations cannot be rendered for it; a stage=rm "
                                                   f"final/ carries the one it was trained with")


def resolve_resume(cfg: DictConfig, derived: Derived) -> Path | None:
    out = Path(cfg.output_dir)
    if cfg.resume == "never":
        if (out / "config.yaml").exists():
            raise ConfigError("resume", f"output_dir={out} already holds a run. Continue it with resume=auto, "
                                        f"or choose another output_dir")
        return None
    if cfg.resume == "auto":
        found = checkpoint.latest_checkpoint(out)
    else:
        found = Path(cfg.resume)
        if not (found / checkpoint.STATE_FILE).is_file():
            raise ConfigError("resume", f"{found} is not a complete checkpoint; use resume=auto or a "
                                        f"checkpoints/step-N folder")
    if found is None:
        return None
    state = checkpoint.read_state(found)
    if state.get("world_size") not in (None, derived.world_size):
        raise ConfigError("launcher.workers", f"the checkpoint {found} was written by {state['world_size']} workers; "
                                              f"resume with launcher.workers={state['world_size']}")
    if state["step"] > cfg.trainer.max_steps:
        raise ConfigError("trainer.max_steps", f"the checkpoint {found} is at step {state['step']}, past "
                                               f"trainer.max_steps={cfg.trainer.max_steps}")
    return found


def already_finished(cfg: DictConfig, resume_from: Path) -> bool:
    return (checkpoint.read_state(resume_from)["step"] == cfg.trainer.max_steps
            and (Path(cfg.output_dir) / "final" / "config.json").is_file())


def check_eval_references(cfg: DictConfig, prompts_file: Path) -> None:
    """trainer.eval_metrics that need a kind of reference (JSON objects) fail now, not at step 0 in the workers."""
    lines = prompts_file.read_text(encoding="utf-8").splitlines() if prompts_file.is_file() else []
    check_references(cfg.trainer.eval_metrics, [json.loads(line)["reference"] for line in lines if line.strip()],
                     "trainer.eval_metrics", f"data ({cfg.data.eval_path or cfg.data.path})")
