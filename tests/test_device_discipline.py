"""Device discipline without a GPU: every stage's step and eval functions run with the model on the `meta`
device, while batches, cached tables and sums start wherever the code puts them (the loader's batches on the
host, as on a GPU machine).

Two things make a GPU mistake fail here. A tensor the code leaves on the host meets a meta tensor and torch
raises ("Tensor on device cpu is not on the expected device meta!"), as CUDA would. And a meta tensor has no
values, so any read-back (.item(), .tolist(), float(), .cpu()) raises, except through dist.to_host, the one
sync point the stages are allowed, which the tests replace and count: a step reads the device back once,
never once per micro-batch.

The models are the tiny model built from its config on meta, with eager attention: transformers' sdpa mask
asks `padding_mask.all()` on the host, a sync of the library's own that has no value to read on meta. What
the stage functions use of a DeepSpeed engine is MetaEngine.
"""

import json
import types

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer
from transformers import masking_utils

from helpers import as_rows
from ftcluster.config import ASSETS, compose
from ftcluster.data.loader import GlobalBatchLoader
from ftcluster.objectives.advantages import gae, group_relative, sequence_rewards_to_tokens, whiten
from ftcluster.rl import roles
from ftcluster.stages import dpo, rm, sft
from ftcluster.train import reference as reference_module
from ftcluster.train.model import MODEL_CLASSES, apply_peft
from ftcluster.train.reference import ReferenceLogps
from ftcluster.util import dist

META = torch.device("meta")
TINY_DIR = ASSETS / "models" / "tiny"
PAD = 2


# ==== The stand-ins: the device, its one read-back, an engine ===========================================

class HostReads:
    """dist.to_host on meta: zeros of the tensor's shape and dtype (a meta tensor has no values), counted."""

    def __init__(self):
        self.count = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor.detach().cpu()
        self.count += 1
        return torch.zeros(tensor.shape, dtype=tensor.dtype)


@pytest.fixture
def host_reads(monkeypatch) -> HostReads:
    """The compute device is meta for everything that asks ftcluster.util.dist."""
    reads = HostReads()
    monkeypatch.setattr(dist, "device", lambda: META)
    monkeypatch.setattr(dist, "to_host", reads)
    return reads


class MetaEngine:
    """What the stage functions use of a DeepSpeed engine, around a model on meta, with a real optimizer."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        self.backwards = self.steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert loss.device == META and loss.requires_grad
        loss.backward()
        self.backwards += 1

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def zero_optimization(self) -> bool:
        # As under ZeRO, where DeepSpeed keeps the gradient norm: engine.optimizer_step measures it itself only
        # for fp32 without ZeRO, with a float() (a sync of engine.py's, outside what these tests cover).
        return True

    def fp16_enabled(self) -> bool:
        return False

    bfloat16_enabled = fp16_enabled
    zero_optimization_partition_weights = fp16_enabled

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


def meta_model(kind: str = "causal_lm", cfg=None) -> torch.nn.Module:
    """The tiny model of `kind` (ftcluster.train.model.MODEL_CLASSES) on meta; with LoRA when cfg says so."""
    config = AutoConfig.from_pretrained(TINY_DIR, **({} if kind == "causal_lm" else {"num_labels": 1}))
    with torch.device("meta"):
        model = MODEL_CLASSES[kind].from_config(config, attn_implementation="eager")
    model.config.use_cache = False
    if cfg is not None and cfg.peft.method != "none":
        model = apply_peft(model, cfg, kind)
    assert {p.device for p in model.parameters()} == {META}
    return model


def frozen_meta_model() -> torch.nn.Module:
    return meta_model().eval().requires_grad_(False)


class Tracker:
    def __init__(self):
        self.logged: dict = {}

    def log(self, step: int, metrics: dict) -> None:
        self.logged.update(metrics)

    def message(self, text: str) -> None:
        pass


# ==== Data: rows as the prepared splits hold them ========================================================

def _ids(n: int, seed: int) -> list[int]:
    return [(7 * seed + 13 * k) % 990 + 5 for k in range(n)]


def sft_rows(count: int = 8, packed: bool = False) -> datasets.Dataset:
    rows = []
    for i in range(count):
        if packed:  # two examples per row
            a, b = 5 + i % 3, 4 + i % 2
            ids = _ids(a + b, i)
            rows.append({"input_ids": ids, "labels": [-100] + ids[1:a] + [-100] + ids[a + 1:],
                         "example_lengths": [a, b], "num_examples": 2})
        else:
            n = 6 + i % 4
            ids = _ids(n, i)
            rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:], "example_lengths": [n],
                         "num_examples": 1})
    return datasets.Dataset.from_list(rows)


def pair_rows(count: int = 8) -> datasets.Dataset:
    rows = []
    for i in range(count):
        prompt = _ids(3, i)
        chosen, rejected = _ids(3 + i % 3, i + 100), _ids(2 + i % 2, i + 200)
        rows.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * 3 + chosen,
                     "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * 3 + rejected,
                     "margin": 0.5 * (i % 2)})
    return datasets.Dataset.from_list(rows)


def loader(rows: datasets.Dataset, packed: bool = False) -> GlobalBatchLoader:
    """Two accumulation micro-batches of two rows per step, one rank."""
    return GlobalBatchLoader(as_rows(rows), global_batch=4, micro_batch=2, rank=0, world_size=1, seed=0, shuffle=False,
                             pad_id=PAD, packed=packed)


def stage_context(cfg, engine, rows, tmp_path) -> types.SimpleNamespace:
    """What an SPMD stage reads of its StageContext."""
    return types.SimpleNamespace(cfg=cfg, engine=engine, loader=loader(rows), eval_rows=as_rows(rows.select(range(5))),
                                 eval_prompts=[], tracker=Tracker(), model_dir=str(TINY_DIR), rank=0, world_size=1,
                                 pad_id=PAD, ds_config={"zero_optimization": {"stage": 0}})


@pytest.fixture(scope="module")
def base_cfg():
    return compose(["model=tiny", "peft=none", "trainer.micro_batch_per_device=2", "output_dir=unused"])


def configured(base, tmp_path, *sections: dict):
    cfg = base.copy()
    cfg.output_dir = str(tmp_path / "run")
    for section in sections:
        for dotted, value in section.items():
            node, *path, key = ("cfg." + dotted).split(".")
            target = cfg
            for name in path:
                target = target[name]
            target[key] = value
    return cfg


# ==== SFT ================================================================================================

@pytest.fixture
def packed_positions_without_a_sync(monkeypatch):
    """transformers asks on the host whether position ids restart (`.all()`) before building the packed mask
    for eager attention: a library shortcut with no value to read on meta. The mask is built always instead."""
    def find_packed_sequence_indices(position_ids):
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", find_packed_sequence_indices)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk_tokens", [0, 4], ids=["full_logits", "chunked"])
def test_sft_step_and_eval_loss_keep_to_the_device(host_reads, packed_positions_without_a_sync, base_cfg, tmp_path, packed,
                                                   chunk_tokens):
    engine = MetaEngine(meta_model())
    rows = sft_rows(packed=packed)
    stats = sft.train_step(engine, loader(rows, packed).micro_batches(0), 1, chunk_tokens)
    assert engine.backwards == engine.steps == 2
    assert stats["examples"] == (8 if packed else 4) and stats["label_tokens"] > 0

    cfg = configured(base_cfg, tmp_path, {"data.packing": packed})
    ctx = stage_context(cfg, engine, rows, tmp_path)
    assert set(sft.eval_loss(ctx)) == {"eval_loss", "eval_ppl"}
    assert engine.training  # eval mode was left


# ==== Reward model =======================================================================================

def test_reward_model_step_and_eval_keep_to_the_device(host_reads, base_cfg, tmp_path):
    cfg = configured(base_cfg, tmp_path, {"stage.name": "rm", "stage.rm.margin": 0.25})
    engine = MetaEngine(meta_model("reward"))
    ctx = stage_context(cfg, engine, pair_rows(), tmp_path)

    result = rm.train_step(ctx, 0)
    assert engine.steps == 2 and result.examples == 4
    assert host_reads.count == 1  # the step's sums, once: not once per micro-batch

    rm.evaluate(ctx, 0, generate=False)
    assert host_reads.count == 2
    assert set(ctx.tracker.logged) == {"eval_loss", "eval_accuracy", "eval_margin", "eval_rewards_chosen",
                                       "eval_rewards_rejected"}


# ==== DPO ================================================================================================

def _dpo_context(base_cfg, tmp_path, monkeypatch, peft: str = "none", reference: str = "cached"):
    cfg = configured(base_cfg, tmp_path, {"stage.name": "dpo", "stage.dpo.reference": reference,
                                          "stage.dpo.reference_cache_dir": str(tmp_path / "cache"),
                                          "peft.method": peft})
    # What the cache key reads of the prepared data.
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "stats.json").write_text(json.dumps({"fingerprint": "rows-of-this-test"}))
    frozen_copies = []

    def frozen_copy(ctx):
        frozen_copies.append(frozen_meta_model())
        return frozen_copies[-1]

    monkeypatch.setattr(reference_module, "_frozen_copy", frozen_copy)
    ctx = stage_context(cfg, MetaEngine(meta_model(cfg=cfg)), pair_rows(), tmp_path)
    return ctx, frozen_copies


def _dpo_step_and_eval(ctx, reference, host_reads) -> None:
    before, steps = host_reads.count, ctx.engine.steps
    result = dpo.train_step(ctx, 0, reference)
    assert ctx.engine.steps == steps + 2 and result.examples == 4
    assert host_reads.count == before + 1  # the step's sums, once
    metrics = dpo.eval_pairs(ctx, reference)
    assert host_reads.count == before + 2
    assert {"eval_loss", "eval_rewards_accuracy", "eval_logps_chosen"} <= set(metrics)


def test_dpo_with_the_cached_reference_keeps_to_the_device(host_reads, base_cfg, tmp_path, monkeypatch):
    ctx, frozen_copies = _dpo_context(base_cfg, tmp_path, monkeypatch)
    computed = ReferenceLogps(ctx, cached=True)  # the reference pass: a forward per batch, then cached
    assert not computed.cache_hit and len(frozen_copies) == 1 and computed.forward_batches > 0
    _dpo_step_and_eval(ctx, computed, host_reads)

    read = ReferenceLogps(ctx, cached=True)  # the tables read back from disk
    assert read.cache_hit and read.forward_batches == 0
    logps = read.logps(ctx.loader.micro_batches(0)[0])
    assert {logps.chosen.device, logps.rejected_tokens.device} == {META}
    _dpo_step_and_eval(ctx, read, host_reads)


@pytest.mark.parametrize("peft", ["none", "lora"], ids=["frozen_copy", "adapters_disabled"])
def test_dpo_with_a_live_reference_keeps_to_the_device(host_reads, base_cfg, tmp_path, monkeypatch, peft):
    ctx, frozen_copies = _dpo_context(base_cfg, tmp_path, monkeypatch, peft=peft, reference="live")
    reference = ReferenceLogps(ctx, cached=False)
    assert len(frozen_copies) == (1 if peft == "none" else 0)
    _dpo_step_and_eval(ctx, reference, host_reads)
    assert reference.forward_batches == 2 + 3  # two training micro-batches, three eval batches (5 pairs)


# ==== PPO and GRPO roles =================================================================================

def samples(count: int = 5) -> list[dict]:
    out = []
    for i in range(count):
        response = _ids(2 + i % 3, i + 300)
        values = [0.1 * k for k in range(len(response))]
        out.append({"prompt_ids": _ids(3 + i % 2, i), "response_ids": response, "old_logps": values,
                    "ref_logps": values, "advantages": values, "old_values": values, "returns": values,
                    "prompt": [{"role": "user", "content": f"question {i}"}], "completion": f"answer {i}"})
    return out


def role(worker_class, cfg, **attributes):
    """A role worker as its setup() leaves it, with meta models instead of loaded ones."""
    worker = worker_class({})
    worker.cfg, worker.pad_id, worker.rank, worker.world_size = cfg, PAD, 0, 1
    for name, value in attributes.items():
        setattr(worker, name, value)
    return worker


def _rl_cfg(base_cfg, tmp_path, peft: str = "none"):
    return configured(base_cfg, tmp_path, {"stage.name": "ppo", "stage.rl.kl_mode": "loss", "stage.rl.kl_coef": 0.1,
                                          "stage.rl.temperature": 0.7, "peft.method": peft})


@pytest.mark.parametrize("peft", ["none", "lora"], ids=["frozen_copy", "adapters_disabled"])
def test_policy_role_scores_and_updates_on_the_device(host_reads, base_cfg, tmp_path, peft):
    cfg = _rl_cfg(base_cfg, tmp_path, peft)
    engine = MetaEngine(meta_model(cfg=cfg))
    policy = role(roles.PolicyWorker, cfg, engine=engine, frozen=frozen_meta_model() if peft == "none" else None)
    batch = samples()

    scored = policy.logprobs(batch, reference=True)  # the policy's own, and the reference it stands in for
    assert [len(row) for row in scored["policy"]] == [len(s["response_ids"]) for s in batch]
    assert [len(row) for row in scored["reference"]] == [len(s["response_ids"]) for s in batch]
    assert host_reads.count == 2  # one read-back per pass, not per chunk

    stats = policy.train(batch, global_tokens=sum(len(s["response_ids"]) for s in batch))
    assert engine.steps == 3  # chunks of two samples
    assert stats["tokens"] == sum(len(s["response_ids"]) for s in batch)
    assert set(stats) == {"policy_loss", "kl", "clipped", "entropy_proxy", "tokens"}
    assert host_reads.count == 3


def test_reference_role_scores_on_the_device(host_reads, base_cfg, tmp_path):
    reference = role(roles.ReferenceWorker, _rl_cfg(base_cfg, tmp_path), model=frozen_meta_model())
    assert [len(row) for row in reference.logprobs(samples())] == [len(s["response_ids"]) for s in samples()]
    assert host_reads.count == 1


def test_critic_role_values_and_update_on_the_device(host_reads, base_cfg, tmp_path):
    critic = role(roles.CriticWorker, _rl_cfg(base_cfg, tmp_path), engine=MetaEngine(meta_model("value")))
    assert [len(row) for row in critic.values(samples())] == [len(s["response_ids"]) for s in samples()]
    stats = critic.train(samples(), global_tokens=20)
    assert critic.engine.steps == 3 and stats["tokens"] == sum(len(s["response_ids"]) for s in samples())
    assert host_reads.count == 2


def test_reward_model_role_scores_on_the_device(host_reads, base_cfg, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    reward = role(roles.RewardWorker, _rl_cfg(base_cfg, tmp_path), tokenizer=tokenizer,
                  model=meta_model("reward").eval().requires_grad_(False))
    assert len(reward.score(samples())) == 5
    assert host_reads.count == 1


def test_advantages_stay_on_the_device_of_their_inputs():
    """The RL objectives are pure tensor functions: given device tensors they compute there, without a sync."""
    mask = torch.ones(4, 6, dtype=torch.bool, device=META)
    rewards, values = torch.ones(4, device=META), torch.ones(4, 6, device=META)
    tokens = sequence_rewards_to_tokens(rewards, mask)
    advantages, returns = gae(tokens, values, mask, gamma=1.0, lam=0.95)
    outputs = (tokens, advantages, returns, whiten(advantages, mask), group_relative(rewards, group_size=2))
    assert {t.device for t in outputs} == {META}
