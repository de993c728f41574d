"""vLLM rollouts against Hugging Face generate, side by side in one run on the same model, prompts and weights
(SmolLM2-135M-Instruct, the embedded default, fp32). Run it in the vLLM environment (README, 'vLLM rollouts').

1. Rollout tokens/s: the held-out prompts of the bundled task, sampled at temperature 1 to a fixed length
   (EOS ignored, so both sides generate the same number of tokens), by ftcluster's HF sampler
   (ftcluster.rl.sampling) on the plain model and on a LoRA policy (adapters unmerged, as HF rollouts of a
   LoRA run generate), and by a vLLM engine holding the same weights (ftcluster.rl.vllm_engine).
2. GRPO step time of the default recipe (conf/stage/grpo.yaml on the embedded default) with HF rollouts on
   the policy, with vLLM rollouts, and with vLLM one step off-policy: the median step time after the first
   step, and the share of it spent in the weight sync.

    python benchmarks/vllm_rollouts.py                   # report to benchmarks/results/
    python benchmarks/vllm_rollouts.py --steps 4 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
MODEL = "bundled:smollm2-135m-instruct"


def rollout_speed(prompts: int, new_tokens: int, rounds: int) -> dict:
    """Tokens/s of both samplers on the same prompts and weights, best of `rounds` each, in this process."""
    import torch
    from omegaconf import OmegaConf

    from ftcluster.config.schema import VLLMConfig
    from ftcluster.rl.sampling import sample_responses
    from ftcluster.rl.vllm_engine import VLLMSampler
    from ftcluster.rl.weights import split_aliases, with_aliases
    from ftcluster.train.bundled import resolve_model_path
    from ftcluster.train.tokenizer import load_tokenizer
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(MODEL)
    tokenizer = load_tokenizer(folder, False)
    rows = [json.loads(line) for line in (REPO / "ftcluster/assets/data/json_extract/eval.jsonl").open()]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                                         add_generation_prompt=True, return_dict=False) for r in rows[:prompts]]
    threads = len(os.sched_getaffinity(0))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sides = {}
    started = time.perf_counter()
    # No EOS on either side (None for vLLM, an id outside the vocabulary for HF): every answer runs to
    # new_tokens, so both generate the same number of tokens.
    engine = VLLMSampler(folder, torch.float32, OmegaConf.structured(VLLMConfig), 1024, 0, None, False)
    engine_start = time.perf_counter() - started
    state, aliases = split_aliases(dict(model.state_dict()), model)
    started = time.perf_counter()
    engine.load(with_aliases(state, aliases))
    load_s = time.perf_counter() - started
    # What HF rollouts of a LoRA policy run: the peft model, adapters unmerged (r=8 on every linear layer, as
    # conf/peft/lora.yaml), with zero-initialised B so that it computes what the plain model does.
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"])).eval()
    for name in ("hf", "hf_lora", "vllm"):
        times = []
        for r in range(rounds):
            started = time.perf_counter()
            if name.startswith("hf"):
                out = sample_responses(model if name == "hf" else lora, ids, tokenizer.pad_token_id,
                                       tokenizer.vocab_size + 10_000, new_tokens, 1.0, 1.0, r, False, synced=False,
                                       batch_size=len(ids))
            else:
                out, _ = engine.generate(ids, list(range(len(ids))), 1.0, 1.0, new_tokens, greedy=False)
            times.append(time.perf_counter() - started)
            assert sum(map(len, out)) == len(ids) * new_tokens, f"{name} stopped early: {list(map(len, out))}"
        sides[name] = {"seconds": min(times), "tokens_per_s": len(ids) * new_tokens / min(times)}
    return {"prompts": len(ids), "new_tokens": new_tokens, "threads": threads, "engine_start_s": engine_start,
            "weight_load_s": load_s, **sides, "speedup": sides["vllm"]["tokens_per_s"] / sides["hf"]["tokens_per_s"],
            "speedup_lora": sides["vllm"]["tokens_per_s"] / sides["hf_lora"]["tokens_per_s"]}


def grpo_steps(name: str, overrides: list[str], steps: int, work: Path) -> dict:
    run = work / name
    cmd = [sys.executable, "-m", "ftcluster.cli", "train", "stage=grpo", f"trainer.max_steps={steps}",
           "trainer.eval_every_steps=0", "trainer.save_every_steps=0", "tracking=none", f"output_dir={run}", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r][1:]  # the first step also warms every cache up
    step = statistics.median(r["step_time_s"] for r in rows)
    phases = {key: statistics.median(r.get(key, 0.0) for r in rows)
              for key in ("time_generate_s", "time_sync_s", "time_train_s", "time_logprobs_s")}
    return {"overrides": overrides, "wall_s": time.perf_counter() - started, "step_time_s": step, **phases,
            "sync_share": phases["time_sync_s"] / step,
            "sampler_logp_diff": statistics.median(r.get("sampler_logp_diff", float("nan")) for r in rows)}


def main() -> None:
    from common import RESULTS, environment, wait_for_quiet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="GRPO steps per side (the first is not counted)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    quiet = wait_for_quiet(600, 1.0)
    report = {"date": datetime.date.today().isoformat(), "machine": environment(["torch", "transformers", "vllm"]),
              "quiet": quiet, "rollout": rollout_speed(a.prompts, a.new_tokens, a.rounds)}
    with tempfile.TemporaryDirectory() as tmp:
        report["grpo"] = {name: grpo_steps(name, overrides, a.steps, Path(tmp)) for name, overrides in (
            ("hf", ["stage.rl.generation_backend=hf"]),
            ("vllm", ["stage.rl.generation_backend=vllm"]),
            ("vllm_2_engines", ["stage.rl.generation_backend=vllm", "stage.rl.rollout_workers=2"]),
            ("vllm_off_policy", ["stage.rl.generation_backend=vllm", "stage.rl.off_policy_steps=1"]))}
    g, r = report["grpo"], report["rollout"]
    lines = [f"# vLLM rollouts vs Hugging Face generate ({report['date']}, {report['machine'].get('cpu', 'cpu')})", "",
             f"SmolLM2-135M-Instruct, fp32, {r['threads']} threads, one run, sides measured one after the other.", "",
             f"## Rollout tokens/s ({r['prompts']} prompts x {r['new_tokens']} sampled tokens, best of {a.rounds})", "",
             "| sampler | seconds | tokens/s |", "|---|---|---|",
             *(f"| {n} | {r[n]['seconds']:.2f} | {r[n]['tokens_per_s']:.0f} |" for n in ("hf", "hf_lora", "vllm")), "",
             f"vLLM / HF: **{r['speedup']:.2f}x** against the plain model, **{r['speedup_lora']:.2f}x** against the "
             f"LoRA policy unmerged, which is what HF rollouts of a LoRA run generate with (target 2.5x). Engine "
             f"start {r['engine_start_s']:.1f} s, first weight load {r['weight_load_s']:.2f} s.", "",
             f"## GRPO step time (default recipe, median of steps 2-{a.steps})", "",
             "| rollouts | step s | generate s | sync s | train s | sync share | sampler log-prob diff |",
             "|---|---|---|---|---|---|---|",
             *(f"| {n} | {v['step_time_s']:.2f} | {v['time_generate_s']:.2f} | {v['time_sync_s']:.2f} | "
               f"{v['time_train_s']:.2f} | {v['sync_share']:.1%} | {v['sampler_logp_diff']:.2e} |" for n, v in g.items()),
             "",
             f"HF / vLLM step time: **{g['hf']['step_time_s'] / g['vllm']['step_time_s']:.2f}x** (target 1.8x); "
             f"sync share with vLLM **{g['vllm']['sync_share']:.1%}** (target at most 10%); off-policy / on-policy "
             f"step time {g['vllm_off_policy']['step_time_s'] / g['vllm']['step_time_s']:.2f}x."]
    out = a.out or RESULTS / f"vllm_rollouts_cpu_{report['date']}.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
