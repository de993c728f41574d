"""Sampling responses with Hugging Face generate: what the policy (or a rollout actor) runs each step.

Prompts are left-padded so every row's new tokens start at the same column; a response ends at its
first end-of-sequence token (kept: the model learns to stop) or at max_new_tokens. Sampling is seeded
per call, so a step's rollout is a function of the weights, the prompts and the seed: a resumed run
samples what the uninterrupted one did.
"""

from __future__ import annotations

import torch

from ftcluster.util import dist


@torch.no_grad()
def sample_responses(model, prompt_ids: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                     temperature: float, top_p: float, seed: int, greedy: bool, synced: bool,
                     batch_size: int) -> list[list[int]]:
    """One response per prompt (repeat a prompt to sample it several times), in batches of batch_size.
    synced: ZeRO-3, where every rank must run as many forwards; callers give every rank equal shares."""
    was_training = model.training
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    responses = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
            sampling = {} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            out = model.generate(input_ids=ids.to(dist.device()), attention_mask=mask.to(dist.device()),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                                 synced_gpus=synced, use_cache=True, **({"do_sample": False} if greedy else sampling))
            for row in out[:, width:].tolist():
                responses.append(_until_eos(row, eos_id))
    finally:
        torch.set_rng_state(generator_state)
        model.train(was_training)
    return responses


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens
