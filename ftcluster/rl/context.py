"""What an RL stage (stages/ppo.py, stages/grpo.py) is handed: an RLContext whose methods are the phases
of a step (rollout, score, log-probs, updates, weight sync, evaluation, checkpoints). The stage decides what
to compute from them; the context knows which role group does it and splits every batch over that group's
ranks. The groups are placed by whoever started the controller (ftcluster.launch.actors implements the
two protocols below), so nothing here knows how or where they run.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ftcluster.config.schema import TrainConfig
from ftcluster.data.loader import GlobalBatchLoader
from ftcluster.data.prompts import decode_row
from ftcluster.data.rows import PreparedRows, read_rows
from ftcluster.errors import UserError
from ftcluster.eval.generate import exact_match_rate
from ftcluster.observe.track import ROLLOUTS_FILE, make_tracker, truncate_metrics
from ftcluster.rewards import load_reward_fn, score_samples
from ftcluster.rl import roles
from ftcluster.rl.experience import sampler_mismatch, shares, truncated_is_weights
from ftcluster.train import checkpoint, stop
from ftcluster.train.tokenizer import load_tokenizer
from ftcluster.train.schedule import StepSchedule


AHEAD_FILE = "rollout_ahead.json"


class PendingCalls(Protocol):
    def get(self) -> list:
        """The results in rank order, or the failure of the first rank that failed, died or stalled."""


class RoleGroup(Protocol):
    """One role's actors, forming one process group."""

    def __len__(self) -> int: ...

    def call(self, method: str, *args, per_rank: dict[str, list] | None = None, timeout_s: int | None = None,
             **kwargs) -> list:
        """method(*args, **kwargs) on every rank (rank i also gets {name: values[i]} from per_rank)."""

    def call_async(self, method: str, *args, per_rank: dict[str, list] | None = None,
                   timeout_s: int | None = None, **kwargs) -> PendingCalls: ...

    def describe(self, rank: int) -> str:
        """'role rank i (node, address, pid)', for messages."""


class RolePlacement(Protocol):
    def place(self, roles: dict[str, tuple[type, int, tuple]], colocate: bool, timeout_s: int) -> dict[str, RoleGroup]:
        """roles: name -> (actor class, count, constructor args); the started groups by name."""


@dataclass
class RLContext:
    cfg: TrainConfig  # a DictConfig merged onto the schema, as in StageContext
    payload: dict
    tracker: object
    loader: GlobalBatchLoader
    prompt_rows: PreparedRows
    eval_rows: PreparedRows | None
    groups: dict[str, RoleGroup]
    start_step: int
    tokenizer: object
    reward_fn: Callable[..., float] | None = None
    timings: dict = field(default_factory=dict)
    schedule: StepSchedule = field(init=False)
    # The policy version the rollout actors hold (updates applied), and with stage.rl.off_policy_steps=1 the
    # next step's rollout: (step, calls in flight) or (step, samples) when restored from a checkpoint.
    weights_version: int = 0
    ahead: tuple | None = None
    step_metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        # One process decides for the whole run, so a look at the request file is the whole stop check.
        self.schedule = StepSchedule(self.cfg.trainer, lambda step: stop.seen(self.cfg.output_dir), generation=False)

    @classmethod
    def start(cls, cfg, payload: dict, placement: RolePlacement) -> "RLContext":
        rl, data_dir = cfg.stage.rl, Path(payload["data_dir"])
        stats = json.loads((data_dir / "stats.json").read_text())
        rows = read_rows(data_dir / "train")
        eval_rows = read_rows(data_dir / "eval") if (data_dir / "eval").is_dir() else None
        loader = GlobalBatchLoader(rows, rl.prompts_per_step, rl.prompts_per_step, 0, 1, cfg.seed, cfg.data.shuffle,
                                   stats["pad_id"], False)
        start_step, resume = 0, payload.get("resume_from")
        if resume:
            state = checkpoint.read_state(Path(resume))
            loader.check_state(state["data"])
            start_step = state["step"]
            truncate_metrics(cfg.output_dir, start_step)
            truncate_metrics(cfg.output_dir, start_step, ROLLOUTS_FILE)
        payload = {**payload, "pad_id": stats["pad_id"]}
        kl = rl.kl_coef > 0
        wanted = {
            "policy": (roles.PolicyWorker, cfg.launcher.workers, (payload,)),
            "reference": (roles.ReferenceWorker, rl.reference_workers if kl else 0, (payload,)),
            "reward": (roles.RewardWorker, rl.reward_workers if rl.reward_model else 0, (payload,)),
            "critic": (roles.CriticWorker, rl.critic_workers if cfg.stage.name == "ppo" else 0, (payload,)),
            "rollout": (roles.RolloutWorker, rl.rollout_workers, (payload,)),
        }
        tracker = make_tracker(cfg, 0, start_step, cfg.trainer.max_steps)
        groups = placement.place(wanted, rl.colocate, cfg.launcher.collective_timeout_s)
        placed = ", ".join(f"{name} x{len(group)}" for name, group in groups.items())
        tracker.message(f"{cfg.stage.name}: actor groups {placed} ({'colocated' if rl.colocate else 'separate'})")
        for pending in [group.call_async("setup") for group in groups.values()]:
            pending.get()
        reward_fn = load_reward_fn(rl.reward_fn) if rl.reward_fn else None
        ctx = cls(cfg, payload, tracker, loader, rows, eval_rows, groups, start_step,
                  load_tokenizer(payload["model_dir"], cfg.model.trust_remote_code), reward_fn)
        ctx.sync(start_step)
        ahead = Path(resume) / AHEAD_FILE if resume else None
        if ahead is not None and ahead.is_file():
            ctx.ahead = (start_step, json.loads(ahead.read_text()))
        if start_step:
            tracker.message(f"resumed from {resume} at step {start_step}")
        return ctx

    # ---- phases ---------------------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str):
        """Times a phase of the current step; logged as time_<name>_s."""
        started = time.perf_counter()
        yield
        self.timings[f"time_{name}_s"] = self.timings.get(f"time_{name}_s", 0.0) + time.perf_counter() - started

    def rollout(self, step: int) -> list[dict]:
        """stage.rl.samples_per_prompt sampled responses to each of this step's prompts, as samples:
        {prompt_ids, response_ids, prompt (turns), fields, completion (decoded), group (prompt index),
        policy_lag, and sampler_logps from vLLM}. With stage.rl.off_policy_steps=1 this step's were generated
        while the previous step trained, and the next step's start now."""
        with self.phase("generate"):
            if self.ahead is not None and self.ahead[0] == step:
                samples = self._ahead_samples()
            else:
                samples = self._collect(*self._start_rollout(step))
        self.ahead = None
        if self.cfg.stage.rl.off_policy_steps and step + 1 < self.cfg.trainer.max_steps:
            self.ahead = (step + 1, self._start_rollout(step + 1))
        for sample in samples:
            sample["policy_lag"] = step - sample.pop("version", step)
        return samples

    def _start_rollout(self, step: int) -> tuple[list[dict], int, PendingCalls]:
        rl = self.cfg.stage.rl
        samples = []
        for group, index in enumerate(self.loader.global_rows(step)):
            row = self.prompt_rows[index]
            prompt, fields = decode_row(row)
            for _ in range(rl.samples_per_prompt):
                samples.append({"prompt_ids": row["prompt_ids"], "prompt": prompt, "fields": fields, "group": group})
        return samples, self.weights_version, self._generate([s["prompt_ids"] for s in samples], step)

    def _collect(self, samples: list[dict], version: int, pending: PendingCalls) -> list[dict]:
        parts = pending.get()
        responses = [r for part in parts for r in part["responses"]]
        sampler = [lp for part in parts for lp in part.get("sampler_logps", [])]
        for i, (sample, response) in enumerate(zip(samples, responses)):
            sample.update(response_ids=response, version=version,
                          completion=self.tokenizer.decode(response, skip_special_tokens=True))
            if sampler:
                sample["sampler_logps"] = sampler[i]
        return samples

    def _ahead_samples(self) -> list[dict]:
        """The off-policy rollout of the next step, waited for (once) if still in flight."""
        step, pending = self.ahead
        if not isinstance(pending, list):
            self.ahead = (step, self._collect(*pending))
        return self.ahead[1]

    def _generate(self, prompt_ids: list[list[int]], step: int, greedy: bool = False,
                  max_new_tokens: int | None = None) -> PendingCalls:
        generator = self.groups.get("rollout") or self.groups["policy"]
        extra = {"version": self.weights_version} if "rollout" in self.groups else {}
        # Seeded by (seed, step, rank): a resumed run samples what the uninterrupted one did.
        seeds = [self.cfg.seed * 1_000_003 + step * 1009 + rank for rank in range(len(generator))]
        return generator.call_async("generate", greedy=greedy, max_new_tokens=max_new_tokens, **extra,
                                    per_rank={"prompt_ids": shares(prompt_ids, len(generator)), "seed": seeds})

    def score(self, samples: list[dict], step: int) -> list[float]:
        """One reward per sample: the reward function here, or the reward model group."""
        with self.phase("score"):
            return self._rewards(samples, step)

    def _rewards(self, samples: list[dict], step: int) -> list[float]:
        if self.reward_fn is not None:
            return score_samples(self.reward_fn, self.cfg.stage.rl.reward_fn, samples, step)
        group = self.groups["reward"]
        plain = [{"prompt": s["prompt"], "completion": s["completion"]} for s in samples]
        return [r for part in group.call("score", per_rank={"samples": shares(plain, len(group))}) for r in part]

    def logprobs(self, samples: list[dict], policy: bool = True) -> tuple[list | None, list | None]:
        """Per-token log-probs of the responses under the policy before the update (None with policy=False:
        the update's own forward pass stands for them, see update_gives_old_logps), and under the reference
        (None with kl_coef=0)."""
        with self.phase("logprobs"):
            plain = _sequences(samples)
            group, want_ref = self.groups["policy"], self.cfg.stage.rl.kl_coef > 0
            reference = self.groups.get("reference")
            pending_ref = (reference.call_async("logprobs", per_rank={"samples": shares(plain, len(reference))})
                           if reference else None)
            on_policy_group = want_ref and reference is None
            out = (group.call("logprobs", reference=on_policy_group, policy=policy,
                              per_rank={"samples": shares(plain, len(group))}) if policy or on_policy_group else [])
            old = [lp for part in out for lp in part["policy"]] if policy else None
            if old is not None:
                self.against_sampler(samples, old)
            if not want_ref:
                return old, None
            if pending_ref is not None:
                return old, [lp for part in pending_ref.get() for lp in part]
            return old, [lp for part in out for lp in part["reference"]]

    def update_gives_old_logps(self) -> bool:
        """Whether the policy's log-probs before the update can come from the update's own forward pass, saving
        a pass over the rollout (as TRL does with one iteration per generation): one pass over one mini-batch
        changes the weights only after its forward passes. Not with kl_mode=reward, whose rewards need the KL
        before the advantages, nor with tis_cap, whose weights enter the loss."""
        rl = self.cfg.stage.rl
        return (rl.updates_per_rollout == 1 and rl.prompts_per_step * rl.samples_per_prompt <= self.cfg.trainer.global_batch
                and rl.kl_mode != "reward" and not rl.tis_cap)

    def against_sampler(self, samples: list[dict], trainer: list[list[float]]) -> None:
        """Into the step's metrics: how far the sampler's log-probs are from the trainer's before the update
        (numerics of another engine, and the policy lag off-policy); with stage.rl.tis_cap, the truncated
        importance weights that correct for it, on the samples."""
        self.step_metrics.update(self._sampler_metrics(samples, trainer))

    def _sampler_metrics(self, samples: list[dict], trainer: list[list[float]]) -> dict:
        metrics = {"policy_lag": sum(s["policy_lag"] for s in samples) / len(samples)}
        if "sampler_logps" not in samples[0]:
            return metrics
        metrics.update(sampler_mismatch([s["sampler_logps"] for s in samples], trainer))
        cap = self.cfg.stage.rl.tis_cap
        if cap:
            weights, capped = truncated_is_weights([s["sampler_logps"] for s in samples], trainer, cap)
            for sample, row in zip(samples, weights):
                sample["is_weights"] = row
            metrics["tis_capped_fraction"] = capped
        return metrics

    def values(self, samples: list[dict]) -> list[list[float]]:
        critic = self.groups["critic"]
        with self.phase("values"):
            parts = critic.call("values", per_rank={"samples": shares(_sequences(samples), len(critic))})
            return [v for part in parts for v in part]

    def update(self, role: str, samples: list[dict], keys: tuple[str, ...]) -> dict:
        """stage.rl.updates_per_rollout passes over the rollout in mini-batches of trainer.global_batch
        sequences, one optimizer step each on `role`; returns the summed statistics of the last pass, and
        under "logps" the log-probs of the samples that came without old_logps (roles.PolicyWorker.train)."""
        group, size = self.groups[role], self.cfg.trainer.global_batch
        if role == "policy" and "is_weights" in samples[0]:
            keys = (*keys, "is_weights")
        plain = [{"prompt_ids": s["prompt_ids"], "response_ids": s["response_ids"], **{k: s[k] for k in keys}}
                 for s in samples]
        with self.phase("train"):
            for _ in range(self.cfg.stage.rl.updates_per_rollout):
                totals: dict = {}
                for start in range(0, len(plain), size):
                    mini = plain[start:start + size]
                    tokens = sum(len(s["response_ids"]) for s in mini)
                    for part in group.call("train", global_tokens=tokens, per_rank={"samples": shares(mini, len(group))}):
                        if "logps" in part:
                            totals.setdefault("logps", []).extend(part.pop("logps"))
                        for key, value in part.items():
                            totals[key] = totals.get(key, 0.0) + value
        return totals

    def sync(self, version: int) -> None:
        """Rollout actors get the policy's weights (through Ray's object store) and confirm the version and a
        checksum of what they now hold; a lost or stalled actor fails the run within stage.rl.sync_timeout_s."""
        rollout = self.groups.get("rollout")
        if rollout is None:
            return
        whole = self.cfg.stage.rl.generation_backend == "vllm"
        with self.phase("sync"):
            first = version == self.start_step  # the engines start from placeholder weights
            box, digest = self.groups["policy"].call("rollout_weights", version, whole, first)[0]
            confirmed = rollout.call("load_weights", box, timeout_s=self.cfg.stage.rl.sync_timeout_s)
        wrong = [rank for rank, (v, d) in enumerate(confirmed) if v != version or abs(d - digest) > 1e-6 * abs(digest)]
        if wrong:
            raise RuntimeError(f"weight sync to {', '.join(rollout.describe(r) for r in wrong)} failed: it holds "
                               f"{[confirmed[r] for r in wrong]}, the policy (version {version}, checksum {digest})")
        self.weights_version = version

    # ---- bookkeeping ----------------------------------------------------------------------------------

    def policy_lr(self) -> float:
        return self.groups["policy"].call("lr")[0]

    def before_training(self) -> None:
        """Evaluate the starting policy, when the schedule wants it (a fresh start)."""
        if self.schedule.before_training(self.start_step).evaluate:
            self.evaluate(0)

    def end_step(self, step: int, metrics: dict, samples: list[dict], rewards: list[float]) -> bool:
        """Log the step (metrics, and its samples in rollouts.jsonl), evaluate and checkpoint on schedule;
        False when the run must stop here."""
        # trainer.on_nonfinite=stop, as in the SPMD loop: before this step's weights can be saved.
        bad = ", ".join(f"{key}={metrics[key]}" for key in ("loss", "value_loss", "kl")
                        if isinstance(metrics.get(key), float) and not math.isfinite(metrics[key]))
        if bad:
            raise UserError(f"step {step}: non-finite {bad}; the run stopped without saving this step "
                            f"(trainer.on_nonfinite=stop). Lower optim.lr or stage.rl.critic_lr, check the rewards, "
                            f"and continue from the newest checkpoint with resume=auto")
        due = self.schedule.due(step)
        self.tracker.advance()
        if due.log:
            self.tracker.log(step, {**metrics, **self.step_metrics, **self.timings})
            self.tracker.log_rows(ROLLOUTS_FILE, [
                {"step": step, "group": s["group"], "prompt": s["prompt"][-1]["content"], "completion": s["completion"],
                 "reward": reward} for s, reward in zip(samples, rewards)])
        self.timings, self.step_metrics = {}, {}
        if due.evaluate:
            self.evaluate(step)
        ending = self.schedule.ending(step)
        if ending.save:
            self.save_checkpoint(step)
        if ending.stop:
            self.tracker.message(ending.message(self.cfg.output_dir, say_why=False))
            return False
        return True

    def evaluate(self, step: int) -> None:
        """Greedy answers to the held-out prompts: their mean reward and, when the prompts carry a
        reference answer, exact match."""
        if self.eval_rows is None:
            return
        prompts, fields = zip(*(decode_row(row) for row in self.eval_rows))
        answers = self._greedy_answers(list(prompts))
        samples = [{"prompt": p, "completion": a, "fields": f} for p, a, f in zip(prompts, answers, fields)]
        rewards = self._rewards(samples, step)  # not timed: the step's phases are the training ones
        metrics = {"eval_reward_mean": sum(rewards) / len(rewards)}
        if all("reference" in f for f in fields):
            metrics["eval_exact_match"] = exact_match_rate(answers, [f["reference"] for f in fields])
        self.tracker.log(step, metrics)
        self.tracker.message(f"step {step}: held-out mean reward {metrics['eval_reward_mean']:.3f}; "
                             f"e.g. {answers[0]!r}")

    def _greedy_answers(self, prompts: list[list[dict]]) -> list[str]:
        """Greedy answers to the held-out prompts: from the vLLM engines when they hold the current policy
        (no ZeRO gathers, no LoRA layers unmerged), else from the policy group."""
        limit = self.cfg.trainer.eval_max_new_tokens
        if self.cfg.stage.rl.generation_backend != "vllm":
            return self.groups["policy"].call("eval_answers", prompts, limit)[0]
        ids = [row["prompt_ids"] for row in self.eval_rows]
        parts = len(self.groups["rollout"])
        padded = ids + ids[:(-len(ids)) % parts]  # every actor an equal share; the extra answers are dropped
        out = self._generate(padded, step=-1, greedy=True, max_new_tokens=limit).get()
        responses = [r for part in out for r in part["responses"]][:len(ids)]
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]

    def save_checkpoint(self, step: int) -> None:
        tmp = checkpoint.begin(self.cfg.output_dir, step)
        if self.ahead is not None:
            # Off-policy: the next step's rollout came from weights this checkpoint no longer holds; a resumed
            # run reads it back instead of sampling it from newer ones.
            (tmp / AHEAD_FILE).write_text(json.dumps(self._ahead_samples()))
        for role in ("policy", "critic"):
            if role in self.groups:
                self.groups[role].call("save", str(tmp))
        state = {"step": step, "data": self.loader.state_dict(step), "model_dir": self.payload["model_dir"],
                 "world_size": self.cfg.launcher.workers, "launch_id": self.payload["launch_id"],
                 "model_kind": "causal_lm", "roles": sorted(self.groups)}
        path = checkpoint.commit(tmp, state, self.cfg.trainer.keep_last_checkpoints)
        self.tracker.message(f"saved {path}")

    def export_final(self) -> None:
        written = self.groups["policy"].call("export_final", f"{self.cfg.output_dir}/final")[0]
        self.tracker.message(f"exported {written}")


def _sequences(samples: list[dict]) -> list[dict]:
    return [{"prompt_ids": s["prompt_ids"], "response_ids": s["response_ids"]} for s in samples]
