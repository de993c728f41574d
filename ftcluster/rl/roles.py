"""The role actors of the RL stages. Each is one rank of its role's group (ftcluster.launch.actors), holds
its model, sharded by DeepSpeed like any ftcluster model, and exposes what the controller asks of it:

- PolicyWorker: samples responses, scores them under itself (and under the reference when no reference
  group exists: LoRA with adapters disabled, or a frozen copy), and takes clipped policy-gradient steps.
- ReferenceWorker: the frozen starting model, scoring log-probs.
- RewardWorker: a sequence-classification reward model (e.g. a stage=rm final/) scoring decoded text
  with its own tokenizer and chat template, so its vocabulary need not be the policy's.
- CriticWorker (PPO): a value head on a backbone, trained on the returns with a clipped value loss.
- RolloutWorker: a full, unsharded copy of the policy that only generates; it receives the policy's
  weights after every update.

What crosses between actors is plain per-sample lists (token ids, per-token floats); each rank pads
its own share (ftcluster.rl.experience). Masks and counts are computed from the padded batch on the host;
what the models compute stays on the device until one dist.to_host per call.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from ftcluster.config import Derived, apply_schema, derive
from ftcluster.eval.generate import generate_answers, whole_model_gathered
from ftcluster.objectives.logprobs import model_labelled_logps
from ftcluster.objectives.losses import clipped_policy_loss, clipped_value_loss, kl_penalty
from ftcluster.rl.experience import from_lists, pad_sequences, response_mask, to_lists
from ftcluster.rl.sampling import sample_responses
from ftcluster.rl.weights import (checksum, decoder_layers_only, from_arrays, lora_scalings, merged_lora_state,
                                  split_aliases, to_arrays, with_aliases)
from ftcluster.train import checkpoint_io
from ftcluster.train import engine as ds_engine
from ftcluster.train.engine import deepspeed_config, full_state_dict, optimizer_step
from ftcluster.train.export import write_final
from ftcluster.train.model import DTYPES, load_model
from ftcluster.train.tokenizer import load_tokenizer
from ftcluster.util import dist
from ftcluster.util.quiet import quiet_libraries


class RoleWorker:
    """Shared set-up: config, process group, DeepSpeed, seeds; subclasses build their model in setup().
    Started by an actor group, which gives each actor its role, rank and world_size."""

    role: str
    rank: int
    world_size: int

    def __init__(self, payload: dict):
        self.payload = payload

    def setup(self) -> None:
        quiet_libraries()
        self.cfg = apply_schema(self.payload["config"])
        dist.setup(timeout_s=self.cfg.launcher.collective_timeout_s)
        torch.manual_seed(self.cfg.seed)
        self.model_dir = self.payload["model_dir"]
        self.tokenizer = load_tokenizer(self.model_dir, self.cfg.model.trust_remote_code)
        self.pad_id = self.payload["pad_id"]

    def _ds_config(self, cfg=None) -> dict:
        cfg = cfg or self.cfg
        return deepspeed_config(cfg, derive(cfg))

    def _frozen_ds_config(self) -> dict:
        """For a group that only scores: DeepSpeed's batch arithmetic for one micro-batch per rank."""
        cfg = _with_workers(self.cfg, self.world_size)
        cfg.trainer.global_batch = cfg.trainer.micro_batch_per_device * self.world_size
        return deepspeed_config(cfg, Derived(world_size=self.world_size, grad_accum_steps=1))

    def _sharded(self) -> bool:
        return self.cfg.strategy.zero_stage == 3 and self.world_size > 1

    @torch.no_grad()
    def _token_logps(self, model, samples: list[dict], temperature: float) -> list[list[float]]:
        logps, masks = [], []
        for chunk in _chunks(samples, self.cfg.trainer.micro_batch_per_device):
            padded = pad_sequences(chunk, self.pad_id)
            # The inputs go to the device inside; the labels stay here, where the mask is computed.
            logps.append(model_labelled_logps(model, padded, temperature, self.cfg.trainer.loss_chunk_tokens)[0])
            masks.append(response_mask(padded["labels"]))
        return _unpadded(logps, masks)


class PolicyWorker(RoleWorker):
    def setup(self) -> None:
        super().setup()

        cfg, rl = self.cfg, self.cfg.stage.rl
        self.ds_config = self._ds_config()
        with ds_engine.zero3_construction(self.ds_config):
            model = load_model(cfg, self.model_dir)
        self.engine = ds_engine.initialize(model, cfg, self.ds_config)
        # No reference group: this rank is the reference too.
        self.frozen = None
        if rl.kl_coef > 0 and rl.reference_workers == 0 and cfg.peft.method == "none":
            with ds_engine.zero3_construction(self.ds_config):
                frozen = load_model(cfg, self.model_dir, trainable=False)
            self.frozen = ds_engine.initialize_frozen(frozen, self.ds_config)
        resume = self.payload.get("resume_from")
        if resume:

            checkpoint_io.load_engine(self.engine, Path(resume) / "policy", exclude_frozen=cfg.peft.method != "none")

    def generate(self, prompt_ids: list[list[int]], seed: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[list[int]]:

        rl = self.cfg.stage.rl
        # Without rollout workers the policy generates itself: under ZeRO-3 gathered once for the whole
        # generation when it fits, not layer by layer for every token.
        partitioned = self.engine.zero_optimization_partition_weights()
        with whole_model_gathered(self.engine.module, partitioned, print):
            return {"responses": sample_responses(self.engine.module, prompt_ids, self.pad_id,
                                                  self.tokenizer.eos_token_id, max_new_tokens or rl.max_new_tokens,
                                                  rl.temperature, rl.top_p, seed, greedy, synced=self._sharded(),
                                                  batch_size=len(prompt_ids))}

    def logprobs(self, samples: list[dict], reference: bool, policy: bool = True) -> dict:
        """Per-token log-probs of the responses under the policy (at the sampling temperature; unless
        policy=False) and, when asked, under the reference this rank stands in for."""
        temperature = self.cfg.stage.rl.temperature
        out = {"policy": self._token_logps(self.engine, samples, temperature)} if policy else {}
        if reference:
            out["reference"] = self.reference_logprobs(samples)
        return out

    def reference_logprobs(self, samples: list[dict]) -> list[list[float]]:
        temperature = self.cfg.stage.rl.temperature
        if self.frozen is not None:
            return self._token_logps(self.frozen, samples, temperature)
        with self.engine.module.disable_adapter():
            return self._token_logps(self.engine, samples, temperature)

    def train(self, samples: list[dict], global_tokens: int) -> dict:
        """One optimizer step on this rank's share of a mini-batch: the clipped surrogate (and, with
        kl_mode=loss, kl_coef x the KL estimate), summed over tokens and divided by the mini-batch's
        response tokens on all ranks. Returns sums for the metrics. Samples without old_logps take this
        forward pass's own (detached: a ratio of 1), and their log-probs come back as "logps", in order."""

        rl, engine = self.cfg.stage.rl, self.engine
        names = ("policy_loss", "kl", "clipped", "entropy_proxy")
        sums, tokens, own = torch.zeros(len(names), dtype=torch.float64, device=dist.device()), 0, []
        for chunk in _chunks(samples, self.cfg.trainer.micro_batch_per_device):
            batch = pad_sequences(chunk, self.pad_id)
            mask = response_mask(batch["labels"])
            advantages = from_lists([s["advantages"] for s in chunk], mask)
            logps = model_labelled_logps(engine, batch, rl.temperature,
                                         self.cfg.trainer.loss_chunk_tokens)[0]
            mask_d = mask.to(logps.device)
            if "old_logps" in chunk[0]:
                old = from_lists([s["old_logps"] for s in chunk], mask).to(logps.device)
            else:
                old = logps.detach()
                own.append((old, mask))
            per_token, clipped = clipped_policy_loss(logps, old, advantages.to(logps.device), rl.clip_eps)
            if "is_weights" in chunk[0]:  # stage.rl.tis_cap: the sampler's tokens reweighted to the trainer's policy
                per_token = per_token * from_lists([s["is_weights"] for s in chunk], mask).to(logps.device)
            kl = torch.zeros_like(logps)
            if rl.kl_mode == "loss" and rl.kl_coef > 0:
                ref = from_lists([s["ref_logps"] for s in chunk], mask).to(logps.device)
                kl = kl_penalty(logps, ref, rl.kl_estimator)
                per_token = per_token + rl.kl_coef * kl
            loss = (per_token * mask_d).sum() / global_tokens
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            optimizer_step(engine)
            sums += torch.stack([(per_token.detach() * mask_d).sum(), (kl.detach() * mask_d).sum(),
                                 (clipped * mask_d).sum(), (-logps.detach() * mask_d).sum()]).double()
            tokens += int(mask.sum())
        out = {**dict(zip(names, dist.to_host(sums).tolist())), "tokens": float(tokens)}
        if own:
            out["logps"] = _unpadded(*zip(*own))
        return out

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def rollout_weights(self, version: int, whole: bool, first: bool):
        """Collective: the weights the rollout actors need, put in Ray's object store by rank 0; the reference
        travels inside a list so the caller passes it on without fetching the tensors. whole=False (HF
        rollouts with PEFT): only the adapters, gathered from ZeRO-3's shards if need be (megabytes, not the
        model). whole=True (vLLM): the model under its plain names, LoRA folded in; after the first sync of a
        LoRA run only the decoder layers, the rest being frozen. The checksum is taken before the copy to the
        host (on the device, on GPUs)."""
        import ray  # not at the top: the driver imports this module, and launcher=processes runs without Ray

        lora = self.cfg.peft.method != "none"
        if whole:
            state = full_state_dict(self.engine)
            if self.rank == 0 and lora:
                scalings = lora_scalings(self.engine.module)
                state = merged_lora_state(state, scalings)
                state = state if first else decoder_layers_only(state, scalings)
        else:
            state = self._adapter_state() if lora else full_state_dict(self.engine)
        if self.rank != 0:
            return None
        state, aliases = split_aliases(state, self.engine.module)
        digest = checksum(state)
        update = {"version": version, "state": to_arrays(state), "aliases": aliases}
        return [ray.put(update)], digest

    def _adapter_state(self) -> dict:
        """The trainable tensors by name (rank 0; empty elsewhere), gathered from ZeRO-3's shards if need be."""
        named = [(name, p) for name, p in self.engine.module.named_parameters() if p.requires_grad]
        if not self.engine.zero_optimization_partition_weights():
            return {name: p.detach() for name, p in named} if self.rank == 0 else {}
        import deepspeed  # see initialize in train/engine.py

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().clone() for name, p in named} if self.rank == 0 else {}

    def save(self, folder: str) -> None:
        checkpoint_io.save_engine(self.engine, Path(folder) / "policy", exclude_frozen=self.cfg.peft.method != "none")

    def export_final(self, out_dir: str) -> str | None:
        state = full_state_dict(self.engine)
        written = None
        if self.rank == 0:
            written = str(write_final(state, self.cfg, self.model_dir, out_dir))
        dist.barrier()
        return written

    def eval_answers(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        """Greedy answers to chat prompts, spread over this group's ranks; every rank returns them all."""
        return generate_answers(self.engine.module, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=min(32, math.ceil(len(prompts) / self.world_size)), synced=self._sharded())


class ReferenceWorker(RoleWorker):
    def setup(self) -> None:
        super().setup()

        ds_config = self._frozen_ds_config()
        with ds_engine.zero3_construction(ds_config):
            model = load_model(self.cfg, self.model_dir, trainable=False)
        self.model = ds_engine.initialize_frozen(model, ds_config)

    def logprobs(self, samples: list[dict]) -> list[list[float]]:
        return self._token_logps(self.model, samples, self.cfg.stage.rl.temperature)


class RewardWorker(RoleWorker):
    def setup(self) -> None:
        super().setup()


        folder = self.cfg.stage.rl.reward_model
        self.tokenizer = load_tokenizer(folder, self.cfg.model.trust_remote_code)
        ds_config = self._frozen_ds_config()
        with ds_engine.zero3_construction(ds_config):
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=DTYPES[self.cfg.strategy.precision],
                trust_remote_code=self.cfg.model.trust_remote_code).eval().requires_grad_(False)
        self.model = ds_engine.initialize_frozen(model, ds_config)

    @torch.no_grad()
    def score(self, samples: list[dict]) -> list[float]:
        """Rewards of (prompt turns, completion text) pairs, rendered with the reward model's own template."""
        texts = [self.tokenizer.apply_chat_template(s["prompt"] + [{"role": "assistant", "content": s["completion"]}],
                                                    tokenize=False) for s in samples]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            rewards = []
            for chunk in _chunks(texts, self.cfg.trainer.micro_batch_per_device):
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(dist.device()) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                rewards.append(self.model(**enc).logits.squeeze(-1).float())
        finally:
            self.tokenizer.padding_side = side
        return dist.to_host(torch.cat(rewards)).tolist()


class CriticWorker(RoleWorker):
    def setup(self) -> None:
        super().setup()

        # Its own learning rate, and a value head on the reward model's backbone when there is one (a
        # common initialisation: it already reads responses for quality), else on the policy's.
        cfg = _with_workers(self.cfg, self.world_size)
        cfg.optim.lr = self.cfg.stage.rl.critic_lr
        self.critic_cfg = cfg
        ds_config = self._ds_config(cfg)
        backbone = self.cfg.stage.rl.reward_model or self.model_dir
        with ds_engine.zero3_construction(ds_config):
            model = load_model(cfg, backbone, kind="value")
        self.engine = ds_engine.initialize(model, cfg, ds_config)
        resume = self.payload.get("resume_from")
        if resume:

            checkpoint_io.load_engine(self.engine, Path(resume) / "critic", exclude_frozen=cfg.peft.method != "none")

    @torch.no_grad()
    def values(self, samples: list[dict]) -> list[list[float]]:
        values, masks = [], []
        for chunk in _chunks(samples, self.cfg.trainer.micro_batch_per_device):
            batch = pad_sequences(chunk, self.pad_id)
            values.append(self._values(_to_device(batch)))
            masks.append(response_mask(batch["labels"]))
        return _unpadded(values, masks)

    def _values(self, batch: dict) -> torch.Tensor:
        # The value of the state that predicts token t+1 sits at position t: the log-probs' alignment.
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out.squeeze(-1)[:, :-1].float()

    def train(self, samples: list[dict], global_tokens: int) -> dict:
        rl = self.cfg.stage.rl
        value_loss, tokens = torch.zeros((), dtype=torch.float64, device=dist.device()), 0
        for chunk in _chunks(samples, self.cfg.trainer.micro_batch_per_device):
            batch = pad_sequences(chunk, self.pad_id)
            mask = response_mask(batch["labels"])
            old, returns = (from_lists([s[key] for s in chunk], mask) for key in ("old_values", "returns"))
            values = self._values(_to_device(batch))
            per_token = clipped_value_loss(values, old.to(values.device), returns.to(values.device), rl.value_clip)
            masked = per_token * mask.to(values.device)
            self.engine.backward(masked.sum() / global_tokens * self.world_size, scale_wrt_gas=False)
            optimizer_step(self.engine)
            value_loss += masked.detach().sum().double()
            tokens += int(mask.sum())
        return {"value_loss": dist.to_host(value_loss).item(), "tokens": float(tokens)}

    def save(self, folder: str) -> None:
        checkpoint_io.save_engine(self.engine, Path(folder) / "critic", exclude_frozen=self.cfg.peft.method != "none")


class RolloutWorker(RoleWorker):
    """Generates only, from a whole copy of the policy (Hugging Face, or a vLLM engine with
    stage.rl.generation_backend=vllm); load_weights() brings it up to date."""

    def setup(self) -> None:
        super().setup()
        self.version = -1
        cfg = self.cfg
        if cfg.stage.rl.generation_backend == "vllm":
            from ftcluster.rl.vllm_engine import VLLMSampler  # see rollout_weights; vLLM is an optional extra

            self.sampler = VLLMSampler(self.model_dir, DTYPES[cfg.strategy.precision], cfg.stage.rl.vllm,
                                       cfg.stage.rl.vllm.max_model_len or cfg.trainer.max_seq_len, cfg.seed,
                                       self.tokenizer.eos_token_id, cfg.stage.rl.colocate,
                                       # CPU: the node's cores shared by its engines (one node assumed)
                                       engines_per_node=self.world_size)
        else:
            self.sampler = None
            self.model = load_model(cfg, self.model_dir).to(dist.device()).eval()

    def load_weights(self, box: list) -> tuple[int, float]:
        """The policy's update from the object store, loaded; returns its version and the checksum of what was
        loaded (each shared tensor once), which the controller compares with the sender's."""
        import ray  # see rollout_weights

        update = ray.get(box[0])
        received = from_arrays(update["state"])
        state = with_aliases(received, update["aliases"])
        if self.sampler is not None:
            self.sampler.load(state)
        else:
            unexpected = set(state) - set(self.model.state_dict())
            if unexpected:
                raise RuntimeError(f"rollout weights do not match the policy: unexpected {sorted(unexpected)[:5]}")
            self.model.load_state_dict(state, strict=False)
        # vLLM keeps no summable copy of its linear weights on CPU (see vllm_engine.py): what it was handed.
        held = received if self.sampler is not None else self.model.state_dict()
        self.version = update["version"]
        return self.version, checksum({name: held[name] for name in received})

    def generate(self, prompt_ids: list[list[int]], seed: int, version: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> dict:
        if version != self.version:
            raise RuntimeError(f"rollout weights are at version {self.version}, the policy at {version}: a weight "
                               f"sync was lost")
        rl = self.cfg.stage.rl
        max_new_tokens = max_new_tokens or rl.max_new_tokens
        if self.sampler is not None:
            # One seed per request, derived from this call's: the same prompts sample the same answers.
            seeds = [(seed * 1_000_003 + i) % 2**63 for i in range(len(prompt_ids))]
            responses, logps = self.sampler.generate(prompt_ids, seeds, rl.temperature, rl.top_p, max_new_tokens,
                                                     greedy)
            return {"responses": responses, "sampler_logps": logps}
        return {"responses": sample_responses(self.model, prompt_ids, self.pad_id, self.tokenizer.eos_token_id,
                                              max_new_tokens, rl.temperature, rl.top_p, seed, greedy, synced=False,
                                              batch_size=len(prompt_ids))}


def _with_workers(cfg, workers: int):
    """The config as a group of `workers` ranks sees it (DeepSpeed's batch arithmetic uses the world size)."""
    copied = copy.deepcopy(cfg)
    copied.launcher.workers = workers
    return copied


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _to_device(batch: dict) -> dict:
    return {k: v.to(dist.device()) for k, v in batch.items()}


def _unpadded(values: list[torch.Tensor], masks: list[torch.Tensor]) -> list[list[float]]:
    """Per-sample lists of the masked entries of each chunk's [batch, tokens - 1] device tensor, the masks
    being on the host: one trip back from the device for all the chunks."""
    if not values:
        return []
    host = dist.to_host(torch.cat([v.flatten() for v in values])).split([v.numel() for v in values])
    return [row for part, mask in zip(host, masks) for row in to_lists(part.view(mask.shape), mask)]

