"""The typed config schema, Hydra composition, and validate(): everything a run needs is checked here,
before any process or cluster starts.

The YAML tree under conf/ supplies values; the dataclasses below supply types and the set of keys that
exist. Composition merges the YAML onto the schema, so a misspelt key or a string where a number
belongs fails with the key's name instead of deep inside a worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.errors import ConfigError, DataError, UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local Hugging Face folder (config.json, weights, tokenizer). Bundled models fill it in.
    path: Optional[str] = None
    # "pretrained" loads the folder's weights; "random" builds the architecture from its config.json
    # with seeded random weights (the tiny test model ships no weights).
    init: str = "pretrained"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    name: str = "custom"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    format: str = "chat"
    # Held out from `path` when there is no eval_path (a fraction, 0 disables).
    eval_fraction: float = 0.0
    # A Jinja chat template (inline, or a path to a .jinja file) replacing the tokenizer's own.
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    # "assistant": loss on assistant tokens only; "all": on every token of the rendered chat.
    train_on: str = "assistant"
    packing: bool = True
    # What to do with an example longer than trainer.max_seq_len: truncate, drop or error.
    truncation: str = "truncate"
    shuffle: bool = True


@dataclass
class RewardModelConfig:
    """stage=rm: Bradley-Terry on preference pairs, a scalar head on the backbone."""

    # Added to every pair's margin (a record's own `margin` field adds to it): -log sigmoid(r_c - r_r - m).
    margin: float = 0.0


@dataclass
class DPOConfig:
    """stage=dpo: the DPO family."""

    # sigmoid (DPO; with label_smoothing > 0 conservative DPO), ipo, and the reference-free simpo, orpo.
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # SimPO's target margin gamma: -log sigmoid(beta * (avg logp_c - avg logp_r) - gamma).
    simpo_gamma: float = 0.5
    # RPO (TRL's rpo_alpha): add this weight times the NLL of the chosen answers, per token.
    sft_weight: float = 0.0
    # cached: the reference's log-probs are computed once, before training, and kept on disk (keyed by
    # model, data and template) for every later epoch and run; live: a reference forward every step.
    reference: str = "cached"
    # Where cached reference log-probs live (null: <FTCLUSTER_CACHE or ~/.cache/ftcluster>/reference_logps).
    # Only rank 0 reads and writes it; point it at shared storage to reuse it from any node.
    reference_cache_dir: Optional[str] = None


@dataclass
class RLConfig:
    """stage=ppo and stage=grpo: rollouts on Ray actors, one DeepSpeed group per role."""

    # Rollout size per step: prompts_per_step x samples_per_prompt sequences (GRPO's group size is
    # samples_per_prompt). trainer.global_batch counts sequences per optimizer step and must divide it.
    prompts_per_step: int = 4
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    # The reward: a Python function ("package.module:function" or "path/to/file.py:function") called as
    # fn(prompt=..., completion=..., **record_fields) -> float, or a reward model folder (reward_model).
    reward_fn: Optional[str] = None
    reward_model: Optional[str] = None
    # KL to the reference: "reward" subtracts kl_coef x k1 per token from the reward (PPO, InstructGPT);
    # "loss" adds kl_coef x the kl_estimator term to the policy loss (GRPO). kl_coef=0 needs no reference.
    kl_coef: float = 0.05
    kl_mode: str = "reward"
    kl_estimator: str = "k1"
    clip_eps: float = 0.2
    # Passes over each rollout (PPO epochs); more than one makes the clipped ratio matter.
    updates_per_rollout: int = 1
    # GRPO: divide group-centred rewards by the group's standard deviation.
    scale_rewards: bool = True
    # PPO: GAE, and the critic (a value head on the policy's backbone, or on reward_model's when given).
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    critic_lr: float = 1.0e-4
    # Actor groups per role: the policy has launcher.workers; 0 reference workers means the policy
    # computes reference log-probs itself (LoRA: adapters disabled; otherwise a frozen copy it holds).
    reference_workers: int = 0
    reward_workers: int = 1
    critic_workers: int = 1
    # 0: the policy actors generate; N: N separate rollout actors generate and get the new weights after
    # every update (sync_timeout_s bounds that, so a lost actor fails the run instead of hanging it).
    rollout_workers: int = 0
    generation_backend: str = "hf"
    sync_timeout_s: int = 300
    # All roles share one set of placement-group bundles (GPU-sharing), or each role gets its own.
    colocate: bool = True


@dataclass
class StageConfig:
    name: str = "sft"
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)


@dataclass
class PeftConfig:
    method: str = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Prompt / prefix tuning.
    num_virtual_tokens: int = 16


@dataclass
class StrategyConfig:
    name: str = "zero0"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "fp32"
    gradient_clipping: float = 1.0
    # A DeepSpeed JSON file whose keys override the generated config.
    deepspeed_config: Optional[str] = None


@dataclass
class LauncherConfig:
    name: str = "local"
    workers: int = 1
    # launcher=ray: HOST:6379 (or ray://HOST:10001) joins a running cluster from this process;
    # http://HOST:8265 submits the whole run as a Ray Job to that cluster's dashboard.
    address: Optional[str] = None
    # null: use GPUs when the cluster has them.
    use_gpu: Optional[bool] = None
    cpus_per_worker: int = 1
    placement_strategy: str = "PACK"
    # Ray Train restarts the whole worker group from the newest checkpoint up to this many times.
    max_failures: int = 0
    # A collective that waits longer than this fails the run, naming the ranks that did not arrive.
    collective_timeout_s: int = 1800
    # How long the driver waits for the expected nodes and resources to be visible in the cluster.
    ready_timeout_s: int = 300
    # Ray Jobs: the folder shipped as the job's working directory (null ships none), and extra
    # runtime_env keys (env_vars, pip, excludes, ...) merged into the job's runtime environment.
    working_dir: Optional[str] = "."
    runtime_env: Dict[str, Any] = field(default_factory=dict)
    # SLURM (launcher=slurm): one Ray node per SLURM node; workers = nodes x gpus_per_node on GPUs.
    nodes: int = 1
    gpus_per_node: int = 0
    # null: workers per node x cpus_per_worker.
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    job_name: str = "ftcluster"
    # Extra sbatch arguments, one per item, e.g. ["--mail-type=END", "--reservation=r1"].
    sbatch_args: List[str] = field(default_factory=list)
    # Shell lines run first on every node (module load, conda or venv activation, exports).
    setup: List[str] = field(default_factory=list)
    # Run every step in this container: pyxis (srun --container-image) or apptainer (apptainer exec).
    container_image: Optional[str] = None
    container_runtime: str = "pyxis"
    container_mounts: List[str] = field(default_factory=list)
    # SLURM sends SIGUSR1 this long before the time limit: the run checkpoints and the job requeues.
    signal_before_end_s: int = 120
    requeue: bool = True


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"
    project: str = "ftcluster"
    group: Optional[str] = None
    name: Optional[str] = None


@dataclass
class TrackingConfig:
    name: str = "default"
    progress: bool = True
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 20
    max_seq_len: int = 512
    micro_batch_per_device: int = 4
    global_batch: int = 8
    log_every_steps: int = 1
    # 0 disables periodic evaluation; an eval always runs at the last step when there is eval data.
    eval_every_steps: int = 0
    save_every_steps: int = 0
    keep_last_checkpoints: int = 2
    # Greedy generation on the eval split, scored by exact match (eval_exact_match in metrics.jsonl):
    # before training and at the last step, and every eval_generate_every_steps when that is set.
    eval_generate: bool = False
    eval_generate_every_steps: int = 0
    eval_max_new_tokens: int = 64
    # What the generated answers are scored by (ftcluster.eval.scores.METRICS), each logged as eval_<name>;
    # eval_exact_match is always logged.
    eval_metrics: List[str] = field(default_factory=lambda: ["exact_match"])
    # Stop cleanly (with a checkpoint) after this many steps; resume=auto continues the schedule.
    stop_after_steps: Optional[int] = None
    # Time every collective (comm_time_s per logged step): blocks the device after each, so communication no
    # longer overlaps computation; for benchmarks (ftcluster bench), not for production runs.
    profile_comms: bool = False
    # On a CPU, hand freed tensor memory back to the OS at once (ftcluster.observe.peak.return_freed_memory), so that
    # the resident set follows the live tensors and peak_memory.json measures what the planner predicts;
    # steps get slower (page faults). For benchmarks (ftcluster bench sets it).
    exact_cpu_memory: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int = 0
    # The schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.0


@dataclass
class ExportConfig:
    # With peft: write merged full weights to final/ (the adapter always goes to final/adapter/).
    merge: bool = True


@dataclass
class EvalConfig:
    """`ftcluster eval`: a model (and a baseline) scored on the eval split of `data` and on a general text set."""

    # What is evaluated: a Hugging Face folder (a run's final/, or the run folder itself), an adapter folder
    # (adapter_config.json), a checkpoints/step-N folder, bundled:NAME, or a conf/model/ name (tiny, smollm2);
    # null: the `model` group of this command line.
    model: Optional[str] = None
    # What it is compared with, in the same forms; auto: the base model of the run or adapter when it can be
    # found (none otherwise); null: no baseline.
    baseline: Optional[str] = "auto"
    # General held-out text (data.format=text records) whose perplexity before and after tuning measures
    # forgetting; null skips it. conf/train.yaml points it at the bundled set.
    general: Optional[str] = None
    # Scores of the greedy answers to the eval prompts (ftcluster.eval.scores.METRICS); [] for perplexity only.
    metrics: List[str] = field(default_factory=lambda: ["exact_match", "accuracy", "token_precision", "token_recall",
                                                        "token_f1", "bleu", "rouge1", "rouge2", "rougeL", "json_valid",
                                                        "json_field_accuracy"])
    max_new_tokens: int = 64
    # Prompts per generate() call on each worker.
    batch_size: int = 16
    # Example outputs in eval.md, where the base and tuned answers differ.
    report_examples: int = 5
    # null: <run>/eval when the model belongs to a run, else runs/eval-<model>.
    output_dir: Optional[str] = None


@dataclass
class SweepConfig:
    """`ftcluster sweep`: trials of this config, each a full `ftcluster train` run in <output_dir>/trials/<trial>.
    Checked (ftcluster.sweep.plan) before any trial starts."""

    # The search space: config key -> distribution, parsed without eval: loguniform(a, b), uniform(a, b),
    # randint(a, b) (a..b inclusive), choice(v1, v2, ...), grid(v1, v2, ...). E.g. {optim.lr: loguniform(1e-5, 1e-3)}.
    params: Dict[str, Any] = field(default_factory=dict)
    # grid: every combination of the grid/choice values once; random: seeded sampling; optuna: TPE (Ray Tune's
    # OptunaSearch), each trial chosen from the results so far.
    search: str = "random"
    # How many trials (random, optuna); null for grid, which runs its size.
    trials: Optional[int] = None
    # Trials at once; each reserves launcher.workers x launcher.cpus_per_worker CPUs (and a GPU per worker).
    concurrency: int = 1
    # Early stopping on `metric` at each evaluation (trainer.eval_every_steps): asha (asynchronous successive
    # halving), median (stop below the median of the others at the same step), or none.
    scheduler: str = "none"
    metric: str = "eval_loss"
    mode: str = "min"
    # No trial is stopped before this many optimizer steps; ASHA keeps 1/reduction_factor of trials per rung.
    grace_steps: int = 1
    reduction_factor: float = 2.0
    # ray: trials on the Ray cluster of `launcher` (local or joined) through Ray Tune; slurm: one SLURM array job
    # (Hydra's submitit launcher), one task per point, each running launcher=local on its node.
    backend: str = "ray"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    # never: refuse an output_dir holding another run; auto: continue from its newest complete checkpoint;
    # or a path to one checkpoint folder.
    resume: str = "never"
    seed: int = 0


CHOICES = {
    "data.format": ("alpaca", "chat", "text", "preference", "prompt"),
    "data.train_on": ("assistant", "all"),
    "data.truncation": ("truncate", "drop", "error"),
    "stage.name": ("sft", "rm", "dpo", "ppo", "grpo"),
    "stage.dpo.loss": ("sigmoid", "ipo", "simpo", "orpo"),
    "stage.dpo.reference": ("cached", "live"),
    "stage.rl.kl_mode": ("reward", "loss"),
    "stage.rl.kl_estimator": ("k1", "k2", "k3"),
    "stage.rl.generation_backend": ("hf", "vllm"),
    "peft.method": ("none", "lora", "dora", "qlora", "prompt", "prefix"),
    "strategy.zero_stage": (0, 1, 2, 3),
    "strategy.precision": ("fp32", "bf16", "fp16"),
    "model.init": ("pretrained", "random"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "launcher.name": ("local", "ray", "slurm", "processes"),
    "launcher.container_runtime": ("pyxis", "apptainer"),
    "launcher.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "tracking.wandb.mode": ("offline", "online", "disabled"),
}
STAGE_FORMATS = {"sft": ("alpaca", "chat", "text"), "rm": ("preference",), "dpo": ("preference",),
                 "ppo": ("prompt", "alpaca", "chat"), "grpo": ("prompt", "alpaca", "chat")}
RL_STAGES = ("ppo", "grpo")


def conf_dir() -> Path:
    """The conf/ tree: the checkout's when running from source (an editable install maps it as
    ftcluster.conf; a checkout that is only on PYTHONPATH has it beside the package), the wheel's otherwise."""
    try:
        return Path(str(resources.files("ftcluster.conf")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "conf"


def _asset(relative: str) -> str:
    return str(ASSETS / relative)


if not OmegaConf.has_resolver("asset"):
    # ${asset:models/tiny} in conf/ points into the installed package, wherever it lives.
    OmegaConf.register_new_resolver("asset", _asset)


def compose(overrides: List[str], config_name: str = "train", config_file: Optional[str] = None) -> DictConfig:
    """Compose conf/<config_name>.yaml with command-line overrides onto the typed schema. With config_file, a
    complete config in a YAML file (a run's config.yaml, a sweep's best.yaml) takes the place of conf/train.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException

    from hydra.core.config_store import ConfigStore

    # The schema is the first entry of conf/train.yaml's defaults list: every key exists (and can be
    # overridden without '+') with its type, before any YAML value lands on it.
    ConfigStore.instance().store(name="ftcluster_schema", node=TrainConfig)
    if config_file is not None:
        ConfigStore.instance().store(name="ftcluster_file", node=_config_file_node(config_file, overrides))
        config_name = "ftcluster_file"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides))
    except OverrideParseException as exc:
        bad = str(exc).splitlines()[0].split(": ", 1)[-1]
        raise UserError(f"the override {bad!r} is not valid Hydra syntax: quote a value that holds spaces, quotes "
                        f"or special characters, e.g. key='it\\'s a value' (in a shell: \"key='it\\'s a value'\"); "
                        f"see https://hydra.cc/docs/advanced/override_grammar/basic") from None
    except HydraException as exc:
        raise UserError(_hydra_message(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(_key_of(exc), _omegaconf_message(exc)) from None
    return apply_schema(raw)


GROUPS = ("model", "data", "stage", "peft", "strategy", "launcher", "tracking", "sweep")


def _config_file_node(path: str, overrides: List[str]) -> dict:
    """The file's values on the schema, as a config node Hydra composes the overrides onto."""
    import yaml

    groups = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in GROUPS]
    if groups:
        raise UserError(f"--config {path} is a complete config: change values in it (e.g. model.path=DIR, "
                        f"trainer.max_steps=100), not groups ({groups[0]})")
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(path, mark.line + 1 if mark else None, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(values, dict):
        raise DataError(path, None, "expected a mapping of config keys (a run's config.yaml, a sweep's best.yaml)")
    return {"defaults": ["ftcluster_schema", "_self_"], **values}


def apply_schema(raw: DictConfig | dict) -> DictConfig:
    """Merge values onto the schema: unknown keys and wrong types fail with the key's name."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        _reject_unknown_keys(OmegaConf.create(raw) if isinstance(raw, dict) else raw, schema, "")
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_key_of(exc), _omegaconf_message(exc)) from None
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _reject_unknown_keys(node: DictConfig, schema: DictConfig, prefix: str) -> None:
    # Hydra's '+key=value' appends keys the schema does not have; they would be silently ignored.
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(dotted, f"no such key. {_keys_hint(schema, prefix)}")
        child, expected = node._get_node(key), schema._get_node(key)
        free_form = isinstance(expected, DictConfig) and OmegaConf.get_type(expected) is dict  # Dict[str, Any]
        if isinstance(child, DictConfig) and isinstance(expected, DictConfig) and not child._is_none() and not free_form:
            _reject_unknown_keys(child, expected, f"{dotted}.")


def _keys_hint(schema: DictConfig, prefix: str) -> str:
    where = prefix.rstrip(".") or "the top level"
    return f"Keys of {where}: {', '.join(str(k) for k in schema.keys())}"


def _key_of(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "full_key", None) or "?")


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    text = str(exc).splitlines()[0]
    if "not in struct" in text or "Key '" in text and "not" in text:
        return f"{text}. Check the spelling; `ftcluster train --help` lists the config groups and keys"
    return text


def _hydra_message(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0]
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        if _schema_has(key):  # the key exists; what it was given does not fit its type
            cause = str(exc.__cause__).splitlines()[0] if exc.__cause__ else "invalid value"
            return (f"config key '{key}': {cause}. For a free-form mapping, add entries one at a time: "
                    f"+{key}.NAME=VALUE")
        section, _, _ = key.rpartition(".")
        node = OmegaConf.select(OmegaConf.structured(TrainConfig), section) if section else None
        hint = _keys_hint(node, section + ".") if isinstance(node, DictConfig) else _keys_hint(
            OmegaConf.structured(TrainConfig), "")
        return f"config key '{key}': no such key. {hint}"
    if first.startswith("Error merging override "):
        override = first[len("Error merging override "):]
        cause = str(exc.__cause__).splitlines()[0] if exc.__cause__ else "invalid value"
        return f"config key '{override.split('=')[0]}': {cause} (from {override})"
    if "Could not find '" in first:
        missing = first.split("Could not find '")[1].split("'")[0]
        options = [line.strip() for line in text.splitlines() if line.startswith("\t") and "provider=" not in line]
        group, _, option = missing.rpartition("/")
        return f"config group '{group}' has no option '{option}'; available: {', '.join(options)} (in {conf_dir()})"
    return first


def _schema_has(key: str) -> bool:
    try:
        return OmegaConf.select(OmegaConf.structured(TrainConfig), key, throw_on_missing=False) is not None
    except OmegaConfBaseException:
        return False


@dataclass
class Derived:
    """Values computed from the config; never set by hand."""

    world_size: int
    grad_accum_steps: int


def derive(cfg: DictConfig) -> Derived:
    t, workers = cfg.trainer, cfg.launcher.workers
    per_step = t.micro_batch_per_device * workers
    if t.global_batch % per_step != 0:
        raise ConfigError(
            "trainer.global_batch",
            f"{t.global_batch} is not divisible by trainer.micro_batch_per_device x launcher.workers = "
            f"{t.micro_batch_per_device} x {workers} = {per_step}. Use a multiple of {per_step}, e.g. "
            f"trainer.global_batch={per_step * max(1, round(t.global_batch / per_step))}",
        )
    if cfg.stage.name in RL_STAGES:
        rl = cfg.stage.rl
        rollout = rl.prompts_per_step * rl.samples_per_prompt
        if rollout % t.global_batch:
            raise ConfigError("trainer.global_batch",
                              f"{t.global_batch} sequences per optimizer step do not divide a rollout of "
                              f"stage.rl.prompts_per_step x stage.rl.samples_per_prompt = {rl.prompts_per_step} x "
                              f"{rl.samples_per_prompt} = {rollout} sequences; use a divisor of {rollout}, e.g. "
                              f"trainer.global_batch={rollout}")
    return Derived(world_size=workers, grad_accum_steps=t.global_batch // per_step)


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def validate(cfg: DictConfig, check_paths: bool = True) -> Derived:
    """Every check that needs no process, no cluster and no model weights. Raises ConfigError."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            listed = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}" if len(allowed) > 1 else str(allowed[0])
            raise ConfigError(key, f"got {value!r}; it must be {listed}")

    positive = ["trainer.max_steps", "trainer.max_seq_len", "trainer.micro_batch_per_device",
                "trainer.global_batch", "trainer.log_every_steps", "launcher.workers",
                "launcher.cpus_per_worker", "trainer.keep_last_checkpoints", "peft.r",
                "trainer.eval_max_new_tokens", "launcher.collective_timeout_s", "launcher.ready_timeout_s",
                "launcher.nodes"]
    for key in positive:
        if _get(cfg, key) < 1:
            raise ConfigError(key, f"got {_get(cfg, key)}; it must be a positive integer")
    for key in ["trainer.eval_every_steps", "trainer.save_every_steps", "trainer.eval_generate_every_steps", "optim.warmup_steps",
                "launcher.max_failures", "optim.weight_decay", "peft.dropout", "launcher.gpus_per_node",
                "launcher.signal_before_end_s"]:
        if _get(cfg, key) < 0:
            raise ConfigError(key, f"got {_get(cfg, key)}; it must be 0 or more")
    if not cfg.optim.lr > 0:
        raise ConfigError("optim.lr", f"got {cfg.optim.lr}; it must be a positive number such as 1e-4")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"got {cfg.data.eval_fraction}; it must be in [0, 1)")
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:
        raise ConfigError("optim.warmup_steps",
                          f"{cfg.optim.warmup_steps} is more than trainer.max_steps={cfg.trainer.max_steps}")
    stop = cfg.trainer.stop_after_steps
    if stop is not None and not 1 <= stop <= cfg.trainer.max_steps:
        raise ConfigError("trainer.stop_after_steps", f"got {stop}; it must be between 1 and trainer.max_steps")
    if cfg.strategy.offload_params and cfg.strategy.zero_stage != 3:
        raise ConfigError("strategy.offload_params",
                          "parameter offload needs ZeRO-3: use strategy=zero3_offload or strategy.zero_stage=3")
    if cfg.strategy.offload_optimizer and cfg.strategy.zero_stage == 0:
        raise ConfigError("strategy.offload_optimizer", "optimizer offload needs ZeRO 1, 2 or 3")

    from ftcluster.eval.scores import check_names

    check_names(cfg.trainer.eval_metrics, "trainer.eval_metrics")
    stage = cfg.stage.name
    if cfg.data.format not in STAGE_FORMATS[stage]:
        expected = ", ".join(STAGE_FORMATS[stage])
        raise ConfigError("data.format", f"stage={stage} trains on {expected} data, not {cfg.data.format!r}"
                          + (f"; {stage} data needs {_FORMAT_FIELDS[STAGE_FORMATS[stage][0]]}"
                             if stage != "sft" else ""))
    if stage == "dpo":
        _check_dpo(cfg)
    if stage in RL_STAGES:
        _check_rl(cfg)
    if cfg.peft.method == "qlora" and not _has_cuda():
        raise ConfigError("peft.method", "QLoRA quantizes with bitsandbytes, which needs a CUDA GPU; "
                                         "on CPU use peft=lora")
    if cfg.peft.method in ("prompt", "prefix") and stage != "sft":
        raise ConfigError("peft.method", f"{cfg.peft.method} tuning is supported for stage=sft only; for stage={stage} "
                                         f"use peft=lora, peft=dora or peft=none")
    if cfg.peft.method in ("prompt", "prefix") and cfg.strategy.zero_stage == 3:
        raise ConfigError("peft.method", f"{cfg.peft.method} tuning is not supported with ZeRO-3 here; "
                                         "use strategy=zero2")
    if cfg.peft.method in ("prompt", "prefix") and cfg.data.packing:
        raise ConfigError("data.packing", f"{cfg.peft.method} tuning prepends virtual tokens, which packed rows "
                                          f"cannot hold per example (peft drops position ids); set data.packing=false")
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation",
                              "flash_attention_2 needs the flash-attn package (pip install 'ftcluster[gpu]' "
                              "on a CUDA machine); use model.attn_implementation=sdpa")
    if cfg.launcher.name == "ray" and not cfg.launcher.address:
        raise ConfigError("launcher.address", "launcher=ray runs on a running cluster: set launcher.address="
                                              "http://HOST:8265 (submit a Ray Job) or HOST:6379 (join it from "
                                              "here), or use launcher=local")
    if cfg.launcher.name == "slurm":
        _check_slurm(cfg.launcher)
    if cfg.launcher.name == "processes":
        _check_processes(cfg)
    if cfg.launcher.name in ("local", "processes"):
        _check_local_capacity(cfg)

    if check_paths:
        _check_paths(cfg)
    return derive(cfg)


_FORMAT_FIELDS = {"preference": "data.format=preference records with prompt, chosen and rejected",
                  "prompt": "data.format=prompt records with a prompt (or alpaca/chat records, whose last answer "
                            "becomes the reference)"}


def _check_dpo(cfg: DictConfig) -> None:
    d = cfg.stage.dpo
    if not d.beta > 0:
        raise ConfigError("stage.dpo.beta", f"got {d.beta}; it must be a positive number such as 0.1")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError("stage.dpo.label_smoothing", f"got {d.label_smoothing}; it must be in [0, 0.5)")
    if d.sft_weight < 0:
        raise ConfigError("stage.dpo.sft_weight", f"got {d.sft_weight}; it must be 0 or more")
    if d.label_smoothing and d.loss not in ("sigmoid", "simpo"):
        raise ConfigError("stage.dpo.label_smoothing", f"label smoothing applies to the sigmoid and simpo losses, "
                                                       f"not {d.loss}; set it to 0")


def _check_rl(cfg: DictConfig) -> None:
    rl, stage = cfg.stage.rl, cfg.stage.name
    for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "updates_per_rollout",
                "sync_timeout_s"):
        if _get(rl, key) < 1:
            raise ConfigError(f"stage.rl.{key}", f"got {_get(rl, key)}; it must be a positive integer")
    for key in ("reference_workers", "reward_workers", "critic_workers", "rollout_workers", "kl_coef"):
        if _get(rl, key) < 0:
            raise ConfigError(f"stage.rl.{key}", f"got {_get(rl, key)}; it must be 0 or more")
    if not rl.temperature > 0:
        raise ConfigError("stage.rl.temperature", f"got {rl.temperature}; sampling needs a positive temperature")
    if not 0 < rl.top_p <= 1:
        raise ConfigError("stage.rl.top_p", f"got {rl.top_p}; it must be in (0, 1]")
    if stage == "grpo" and rl.samples_per_prompt < 2:
        raise ConfigError("stage.rl.samples_per_prompt", "GRPO compares each sample with the others of its group: "
                                                         "it needs at least 2 samples per prompt")
    if (rl.reward_fn is None) == (rl.reward_model is None):
        raise ConfigError("stage.rl.reward_fn", f"stage={stage} needs exactly one reward: "
                                                f"stage.rl.reward_fn=module:function (or file.py:function) or "
                                                f"stage.rl.reward_model=DIR (a stage=rm final/ folder)")
    if rl.reward_model is not None and rl.reward_workers < 1:
        raise ConfigError("stage.rl.reward_workers", "stage.rl.reward_model needs at least one reward worker")
    if stage == "ppo" and rl.critic_workers < 1:
        raise ConfigError("stage.rl.critic_workers", "PPO trains a critic: it needs at least one critic worker")
    # Every group gets an equal share of each rollout (ZeRO-3 forwards are collectives), and the critic
    # takes as many micro-batches per optimizer step as its DeepSpeed config expects.
    rollout = rl.prompts_per_step * rl.samples_per_prompt
    groups = {"launcher.workers": cfg.launcher.workers, "stage.rl.reference_workers": rl.reference_workers,
              "stage.rl.reward_workers": rl.reward_workers if rl.reward_model else 0,
              "stage.rl.critic_workers": rl.critic_workers if stage == "ppo" else 0,
              "stage.rl.rollout_workers": rl.rollout_workers}
    for key, count in groups.items():
        if count and rollout % count:
            raise ConfigError(key, f"{count} workers cannot share a rollout of {rollout} sequences "
                                   f"(stage.rl.prompts_per_step x stage.rl.samples_per_prompt) evenly")
    per_critic_step = cfg.trainer.micro_batch_per_device * rl.critic_workers
    if stage == "ppo" and cfg.trainer.global_batch % per_critic_step:
        raise ConfigError("stage.rl.critic_workers", f"trainer.global_batch={cfg.trainer.global_batch} is not "
                                                     f"divisible by trainer.micro_batch_per_device x "
                                                     f"stage.rl.critic_workers = {per_critic_step}")
    if rl.generation_backend == "vllm":
        raise ConfigError("stage.rl.generation_backend",
                          "the vLLM backend is not available in this version (no GPU was at hand to test its weight "
                          "sync); use stage.rl.generation_backend=hf")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_local_capacity(cfg: DictConfig) -> None:
    workers = cfg.launcher.workers
    use_gpu = cfg.launcher.use_gpu if cfg.launcher.use_gpu is not None else _has_cuda()
    if use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if workers > gpus:
            raise ConfigError("launcher.workers", f"{workers} workers need {workers} GPUs; this machine has "
                                                  f"{gpus}. Use launcher.workers={max(gpus, 1)}")
        return
    cpus = os.cpu_count() or 1
    needed = workers * cfg.launcher.cpus_per_worker
    if needed > cpus:
        raise ConfigError("launcher.workers",
                          f"{workers} workers x launcher.cpus_per_worker={cfg.launcher.cpus_per_worker} need "
                          f"{needed} CPUs; this machine has {cpus}. Use launcher.workers="
                          f"{max(cpus // cfg.launcher.cpus_per_worker, 1)}")


def _check_processes(cfg: DictConfig) -> None:
    """launcher=processes has no Ray: no actor groups, no restarts."""
    if cfg.stage.name in RL_STAGES:
        raise ConfigError("launcher.name", f"stage={cfg.stage.name} places one Ray actor group per role; "
                                           "launcher=processes runs sft, rm and dpo only. Use launcher=local")
    if cfg.launcher.max_failures:
        raise ConfigError("launcher.max_failures", f"got {cfg.launcher.max_failures}; launcher=processes does not "
                                                   "restart workers (Ray Train does, with launcher=local): set 0 and "
                                                   "rerun with resume=auto after a failure")


def _check_slurm(launcher: DictConfig) -> None:
    workers, nodes, gpus = launcher.workers, launcher.nodes, launcher.gpus_per_node
    if gpus and workers != nodes * gpus:
        raise ConfigError("launcher.workers", f"{workers} workers on {nodes} nodes x {gpus} GPUs: one worker per GPU "
                                              f"means launcher.workers={nodes * gpus}")
    if workers % nodes:
        raise ConfigError("launcher.workers", f"{workers} workers do not spread evenly over launcher.nodes={nodes}; "
                                              f"use a multiple of {nodes}")
    needed = workers // nodes * launcher.cpus_per_worker
    if launcher.cpus_per_task is not None and launcher.cpus_per_task < needed:
        raise ConfigError("launcher.cpus_per_task", f"{launcher.cpus_per_task} CPUs per node cannot hold "
                                                    f"{workers // nodes} workers x launcher.cpus_per_worker="
                                                    f"{launcher.cpus_per_worker}; use at least {needed}")


def _check_paths(cfg: DictConfig) -> None:
    if cfg.model.path is None:
        raise ConfigError("model.path", "no model: pick one with model=tiny|smollm2 or set model.path=DIR")
    if not cfg.model.path.startswith("bundled:") and not Path(cfg.model.path, "config.json").is_file():
        raise ConfigError("model.path", f"{cfg.model.path} is not a Hugging Face model folder (no config.json)")
    if Path(cfg.model.path).parent == ASSETS / "model_configs":
        raise ConfigError("model.path", f"model={cfg.model.name} is a shape only (a config.json, no weights and no "
                                        f"tokenizer) for `ftcluster plan`; to train it set model.path=DIR to a folder "
                                        f"holding its weights and tokenizer")
    if cfg.data.path is None:
        raise ConfigError("data.path", "no training data: set data.path=FILE (JSONL, JSON, Parquet or a saved "
                                       "HF dataset folder)")
    for key in ("data.path", "data.eval_path"):
        value = _get(cfg, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(key, f"{value} does not exist")
    ds = cfg.strategy.deepspeed_config
    if ds is not None and not Path(ds).is_file():
        raise ConfigError("strategy.deepspeed_config", f"{ds} does not exist")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_run_config(path: str | Path) -> DictConfig:
    """Load a run's saved config.yaml back onto the schema."""
    return apply_schema(OmegaConf.load(path))
