"""The checks of `ftcluster train` that need more than the config: the resume policy against output_dir,
the reward of an RL stage, the evaluation references. All run before any cluster starts; the submitting
side of a Ray Job or SLURM job runs them too, before the job waits in a queue."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from omegaconf import DictConfig

from ftcluster.config import Derived
from ftcluster.data.formats import read_records, to_example
from ftcluster.data.prompts import as_prompt
from ftcluster.errors import ConfigError, DataError
from ftcluster.eval.scores import check_references
from ftcluster.rewards import load_reward_fn
from ftcluster.train import checkpoint
from ftcluster.train.model_facts import folder_facts


def check_rewards(cfg: DictConfig) -> None:
    """The reward function imports, or the reward model is a sequence classifier whose tokenizer fits it
    and can render a conversation: checked before any actor starts."""
    rl = cfg.stage.rl
    if rl.reward_fn:
        check_reward_fields(cfg, load_reward_fn(rl.reward_fn))
        return
    folder = Path(rl.reward_model)
    if not (folder / "config.json").is_file():
        raise ConfigError("stage.rl.reward_model", f"{folder} is not a Hugging Face model folder (no config.json)")
    from transformers import AutoConfig  # an RL run's driver imports transformers in any case

    from ftcluster.train.tokenizer import load_tokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    if not any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
        raise ConfigError("stage.rl.reward_model", f"{folder} holds {config.architectures}, not a sequence "
                                                   f"classifier; train one with stage=rm and use its final/")
    tokenizer = load_tokenizer(str(folder), cfg.model.trust_remote_code)
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
        found = checkpoint.latest_checkpoint(out, on_skip=_say_skipped)
    else:
        found = Path(cfg.resume)
        if not (found / checkpoint.STATE_FILE).is_file():
            raise ConfigError("resume", f"{found} is not a complete checkpoint; use resume=auto or a "
                                        f"checkpoints/step-N folder")
        problem = checkpoint.unusable(found)
        if problem is not None:
            raise ConfigError("resume", f"the checkpoint {found} cannot be resumed: {problem}. Choose an older "
                                        f"one, or resume=auto (which skips unusable checkpoints)")
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


def _say_skipped(path: Path, problem: str) -> None:
    print(f"[ftcluster] resume=auto: skipping the checkpoint {path}: {problem}; taking the previous complete one "
          f"(the skipped one is moved to checkpoints/{checkpoint.ABANDONED_PREFIX}*/ when the run starts)", flush=True)


def already_finished(cfg: DictConfig, resume_from: Path) -> bool:
    return (checkpoint.read_state(resume_from)["step"] == cfg.trainer.max_steps
            and (Path(cfg.output_dir) / "final" / "config.json").is_file())


def check_eval_references(cfg: DictConfig, prompts_file: Path) -> None:
    """trainer.eval_metrics that need a kind of reference (JSON objects) fail now, not at step 0 in the workers."""
    lines = prompts_file.read_text(encoding="utf-8").split("\n") if prompts_file.is_file() else []
    check_references(cfg.trainer.eval_metrics, [json.loads(line)["reference"] for line in lines if line.strip()],
                     "trainer.eval_metrics", f"data ({cfg.data.eval_path or cfg.data.path})")


# What a folder needs for model.init=pretrained: weights in any layout from_pretrained reads, and a tokenizer.
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model(cfg: DictConfig, model_dir: str) -> None:
    """The resolved model folder holds weights (model.init=pretrained) and a tokenizer that fits its embedding,
    and trainer.max_seq_len fits its positions: each refused here instead of failing or training garbage
    in the workers."""
    folder, where = Path(model_dir), cfg.model.path
    if cfg.model.init == "pretrained" and not any(next(folder.glob(p), None) for p in _WEIGHTS):
        raise ConfigError("model.path", f"{where} has no weights (model.safetensors, pytorch_model.bin or a sharded "
                                        f"index); point model.path at a folder that has them, or set "
                                        f"model.init=random to train from random weights")
    if not any((folder / name).is_file() for name in _TOKENIZER):
        raise ConfigError("model.path", f"{where} has no tokenizer (tokenizer.json or tokenizer_config.json); copy "
                                        f"the model's tokenizer files into it")
    facts = folder_facts(model_dir, cfg.model.trust_remote_code)
    vocab, size = facts.vocab_size, facts.tokenizer.size
    if vocab is not None and size > vocab:
        raise ConfigError("model.path", f"the tokenizer in {where} has {size} tokens but the model only {vocab} "
                                        f"embeddings (vocab_size in config.json): ids past {vocab - 1} have no "
                                        f"embedding. Use the tokenizer the model was trained with, or resize the "
                                        f"embeddings and save the model first")
    positions = facts.max_position_embeddings
    if positions is not None and cfg.trainer.max_seq_len > positions:
        raise ConfigError("trainer.max_seq_len", f"got {cfg.trainer.max_seq_len}; the model in {where} has "
                                                 f"{positions} positions (max_position_embeddings); use "
                                                 f"trainer.max_seq_len={positions} or less")


def check_reward_fields(cfg: DictConfig, fn) -> None:
    """stage.rl.reward_fn is called as fn(prompt=..., completion=..., **record_fields): every distinct set of
    fields in the data must bind to its signature, or the first rollout would fail with a TypeError."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check against
        return
    first: dict[frozenset, tuple[str, int]] = {}  # each set of fields, where it first appears
    for path in (p for p in (cfg.data.path, cfg.data.eval_path) if p):
        for line, record in read_records(path):
            # Every record converted first, so that a malformed one is reported as such, not as a misfit.
            example = as_prompt(to_example(record, cfg.data.format, path, line, cfg.data.system_prompt))
            first.setdefault(frozenset(example["extra"]), (path, line))
    for fields, (path, line) in first.items():
        try:
            signature.bind(prompt=[], completion="", **dict.fromkeys(fields))
        except TypeError as exc:
            raise DataError(path, line, f"stage.rl.reward_fn={cfg.stage.rl.reward_fn} cannot take this record: it "
                                        f"is called with prompt, completion and the record's other fields "
                                        f"({', '.join(sorted(fields)) or 'none'}), and {exc}. Give the function "
                                        f"those parameters (or **fields), or fix the records") from None
