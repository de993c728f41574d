"""`ftcluster train` in the launching process: validate, prepare, record, launch, check the outcome.

Every check that can fail on user input runs here, before any cluster starts: the config, the
output_dir and resume policy, the model folder, and the whole data set (parsed, templated, tokenized
and packed once; workers memory-map the result).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig

from ftcluster.train import checkpoint, stop
from ftcluster.config import RL_STAGES, Derived, to_yaml, validate
from ftcluster.errors import ConfigError
from ftcluster.util.hardware import cpu_model

# Where the workers are placed from this process.
LAUNCHERS = {"local": "ftcluster.launch.local", "ray": "ftcluster.launch.ray", "slurm": "ftcluster.launch.slurm",
             "processes": "ftcluster.launch.processes"}
# Launchers that can instead ship the whole `ftcluster train` to run elsewhere (a Ray Job, a SLURM batch
# job); each says by its `submits(cfg)` whether this process is the submitting side.
SUBMITTERS = {"ray": "ftcluster.launch.ray_jobs", "slurm": "ftcluster.launch.sbatch"}


def submitter_for(cfg: DictConfig):
    """The submitter module when this invocation only submits the run, else None."""
    name = SUBMITTERS.get(cfg.launcher.name)
    module = importlib.import_module(name) if name else None
    return module if module is not None and module.submits(cfg) else None
PACKAGES = ["ftcluster", "torch", "deepspeed", "transformers", "peft", "ray", "hydra-core", "wandb", "datasets",
            "accelerate", "flash-attn"]


def train(cfg: DictConfig, argv: list[str]) -> Path:
    payload = prepare_run(cfg, argv)
    if payload is None:
        print(f"[ftcluster] {cfg.output_dir} is already complete at step {cfg.trainer.max_steps}; final/ is up to date")
        return Path(cfg.output_dir) / "final"
    started = time.time()
    importlib.import_module(LAUNCHERS[cfg.launcher.name]).launch(worker_entry(cfg), payload, cfg)
    return _check_outcome(cfg, started)


def prepare_run(cfg: DictConfig, argv: list[str]) -> dict | None:
    """Everything before the launch: checks, resume policy, model folder, data, config.yaml and
    manifest.json. Returns the payload every worker entry gets, or None when the run is already complete."""
    derived = validate(cfg)
    if cfg.stage.name in RL_STAGES:
        check_rewards(cfg)
    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)
    if cfg.stage.dpo.reference_cache_dir:  # workers may run elsewhere than this working directory
        cfg.stage.dpo.reference_cache_dir = str(Path(cfg.stage.dpo.reference_cache_dir).resolve())
    stop.install_signal_handler(out)  # first: a preemption notice may come at any moment
    resume_from = resolve_resume(cfg, derived)
    if resume_from is not None and _already_finished(cfg, resume_from):
        return None
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint

    model_dir = resolve_model(cfg, out)
    payload = {"config": _plain(cfg), "model_dir": model_dir, "data_dir": str(out / "data"),
               "resume_from": str(resume_from) if resume_from else None, "launch_id": uuid.uuid4().hex}
    stats = prepare_data(cfg, model_dir, out / "data")
    _report_data(stats)
    if cfg.trainer.eval_generate:
        _check_eval_references(cfg, out / "data" / "eval_generate.jsonl")
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "manifest.json").write_text(json.dumps(manifest(cfg, derived, argv, stats), indent=2))
    return payload


def worker_entry(cfg: DictConfig):
    """SPMD stages run one program on every rank; the RL stages run a controller here that places one
    actor group per role."""
    if cfg.stage.name in RL_STAGES:
        from ftcluster.launch.actors import Controller
        from ftcluster.rl.controller import run

        return Controller(run)
    from ftcluster.train.worker import train_worker

    return train_worker


def check_rewards(cfg: DictConfig) -> None:
    """The reward function imports, or the reward model is a sequence classifier whose tokenizer fits it
    and can render a conversation: checked before any actor starts."""
    rl = cfg.stage.rl
    if rl.reward_fn:
        from ftcluster.rewards import load_reward_fn

        load_reward_fn(rl.reward_fn)
        return
    from transformers import AutoConfig

    from ftcluster.train.model import load_tokenizer

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


def _already_finished(cfg: DictConfig, resume_from: Path) -> bool:
    return (checkpoint.read_state(resume_from)["step"] == cfg.trainer.max_steps
            and (Path(cfg.output_dir) / "final" / "config.json").is_file())


def resolve_model(cfg: DictConfig, out: Path) -> str:
    """A local folder every worker can load: bundled models converted, random init materialized."""
    from ftcluster.train.bundled import resolve_model_path

    model_dir = resolve_model_path(cfg.model.path)
    if cfg.model.init == "random":
        from ftcluster.train.model import materialize_random_init

        model_dir = materialize_random_init(model_dir, out / "init_model", cfg.seed)
    return model_dir


def prepare_data(cfg: DictConfig, model_dir: str, data_dir: Path) -> dict:
    from ftcluster.data.prepare import prepare
    from ftcluster.train.model import load_tokenizer

    return prepare(cfg, load_tokenizer(model_dir), data_dir)


def _check_eval_references(cfg: DictConfig, prompts_file: Path) -> None:
    """trainer.eval_metrics that need a kind of reference (JSON objects) fail now, not at step 0 in the workers."""
    from ftcluster.eval.scores import check_references

    lines = prompts_file.read_text(encoding="utf-8").splitlines() if prompts_file.is_file() else []
    check_references(cfg.trainer.eval_metrics, [json.loads(line)["reference"] for line in lines if line.strip()],
                     "trainer.eval_metrics", f"data ({cfg.data.eval_path or cfg.data.path})")


def _report_data(stats: dict) -> None:
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        packing = f", packing efficiency {s['packing_efficiency']:.1%}" if "packing_efficiency" in s else ""
        print(f"[ftcluster] data {split}: {s['examples']} {_UNITS[stats['kind']]} -> {s['rows']} rows, {s['tokens']} "
              f"tokens ({s['trainable_tokens']} trained on), truncated {s['truncated']}, dropped {s['dropped']}"
              f"{packing}")


_UNITS = {"sequences": "examples", "pairs": "preference pairs", "prompts": "prompts"}


def _check_outcome(cfg: DictConfig, started: float) -> Path:
    """Ray can end 'successfully' with nothing done (e.g. a worker that returned early): check the files."""
    out = Path(cfg.output_dir)
    final = out / "final"
    finished = final.is_dir() and final.stat().st_mtime >= started
    requested = stop.request_file(out)
    if requested.exists():
        requested.unlink()
        newest = checkpoint.latest_checkpoint(out)
        if not finished:
            if newest is None or newest.stat().st_mtime < started:
                raise RuntimeError("a stop was requested but the workers wrote no checkpoint; see the log above")
            raise stop.StoppedOnRequest(newest)
    stop_after = cfg.trainer.stop_after_steps
    if stop_after is not None and stop_after < cfg.trainer.max_steps:
        expected = checkpoint.checkpoints_dir(out) / f"step-{stop_after}"
    else:
        expected = out / "final"
    if not expected.is_dir() or expected.stat().st_mtime < started:
        raise RuntimeError(f"the workers finished but {expected} was not written; see the log above")
    return expected


def manifest(cfg: DictConfig, derived: Derived, argv: list[str], stats: dict) -> dict:
    return {
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": _git_sha(),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "hardware": _hardware(),
        "world_size": derived.world_size,
        "grad_accum_steps": derived.grad_accum_steps,
        "data_fingerprint": stats.get("fingerprint"),
    }


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sha.stdout.strip() or None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _plain(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)

