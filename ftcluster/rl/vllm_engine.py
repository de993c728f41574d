"""Rollouts with vLLM (stage.rl.generation_backend=vllm): one engine per rollout actor, fed the policy's full
weights after every update.

The engine runs inside the actor's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size=1):
weights handed to it are passed by reference rather than serialised, an engine that dies takes its actor
with it (the controller then names that actor), and one actor is one engine on one bundle. Rollout actors
are data-parallel; tensor-parallel engines are not supported yet.

The engine starts with placeholder weights (nothing is read from the model folder but its config): the
policy's arrive by load() before the first rollout. Weights arrive as a state dict with Hugging Face
names; vLLM's in-place reload maps them onto its own layout (fused qkv and gate/up projections, tied
embeddings) and re-runs the post-load processing (CPU GEMM repacking) of every layer it is given, so an
update never leaves a stale packed copy. The actor confirms the load with the checksum of the weights it
handed to the engine (ftcluster/rl/roles.py): the engine's own parameters cannot be summed on CPU, where
its linear layers keep only an opaque repacked copy. That vLLM then generates what Hugging Face generate
does with the same weights is what tests/test_vllm_rollouts.py checks.

Log-probs come back for the sampled tokens after temperature and top-p (logprobs_mode=processed_logprobs),
the same quantity the trainer computes, so their difference measures the sampler/trainer mismatch.

On a GPU (code paths that have not run yet: no GPU was at hand):
- colocated (stage.rl.colocate=true): the engine shares its GPU with the policy, so it holds
  stage.rl.vllm.gpu_memory_utilization of it and sleeps (level 1: weights to host memory, KV cache freed)
  between its generation and the next weight load;
- disaggregated: the engine has its own GPU and never sleeps. Weights travel through Ray's object store in
  both layouts (shared memory on one node, the network across nodes); an NCCL broadcast is not implemented.
"""

from __future__ import annotations

import os

import torch

from ftcluster.errors import UserError


class VLLMSampler:
    """A vLLM engine over the policy's architecture, generating token ids from token ids (no tokenizer: the
    controller decodes), its weights replaced by load()."""

    def __init__(self, model_dir: str, dtype: torch.dtype, settings, max_len: int, seed: int, eos_id: int | None,
                 colocated: bool, engines_per_node: int = 1):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gb))
            # vLLM's own binding pins one thread per physical core of a NUMA node and reserves one core; an
            # actor that shares its node with the policy's actors takes threads, not cores.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            # vLLM drops torch to one thread unless OMP_NUM_THREADS asks for more (and then forbids changes).
            threads = settings.cpu_threads or max(1, len(os.sched_getaffinity(0)) // engines_per_node)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        from vllm import LLM  # not at the top: the extra is optional, and importing vLLM takes seconds

        if not on_gpu:
            _check_cpu_head_size(model_dir)
        self.eos_id, self.sleeps = eos_id, on_gpu and colocated
        self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=max_len, tensor_parallel_size=1,
                       distributed_executor_backend="uni", enforce_eager=settings.enforce_eager,
                       skip_tokenizer_init=True, logprobs_mode="processed_logprobs", load_format="dummy",
                       gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=self.sleeps)
        self._sleep()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the weights given, by Hugging Face name (a tied head under its own name too): the whole model
        at the first sync, after that what changed (ftcluster/rl/weights.decoder_layers_only). A layer given
        nothing keeps what it holds."""
        if self.sleeps:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float, top_p: float,
                 max_new_tokens: int, greedy: bool) -> tuple[list[list[int]], list[list[float]]]:
        """One response per prompt (token ids, ending with EOS when the model stopped) and the log-prob of
        each sampled token at the sampling temperature. Request i is seeded by seeds[i]: a resumed run
        samples what the uninterrupted one did."""
        from vllm import SamplingParams

        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        params = [SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                 # eos_id None: run every answer to max_new_tokens (benchmarks)
                                 stop_token_ids=[self.eos_id] if self.eos_id is not None else None,
                                 ignore_eos=self.eos_id is None,
                                 detokenize=False)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        self._sleep()
        responses, logps = [], []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            responses.append(tokens)
            logps.append([float(entry[token].logprob) for entry, token in zip(completion.logprobs, tokens)])
        return responses, logps

    def _sleep(self) -> None:
        # Colocated on a GPU: the policy trains next, and needs the memory (sleep is a no-op on CPU).
        if self.sleeps:
            self.llm.sleep(level=1)


def _check_cpu_head_size(model_dir: str) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only, and an unsupported one fails at the
    first forward, deep in a kernel: say so at start instead."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(model_dir)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise UserError(f"{model_dir}: attention heads of size {head}, which vLLM's CPU kernels do not support "
                        f"(they take {supported}); use stage.rl.generation_backend=hf for this model on CPU")
