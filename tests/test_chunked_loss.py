"""The loss and log-probs from the labelled positions' hidden states (ftcluster.objectives.chunked), in one
piece (loss_chunk_tokens=0, the default) and in recomputed chunks, against the model's full logits computed
here: the same value and the same gradient on every trainable parameter to 1e-5, for the model variants it
must serve; and an SFT run in chunks whose losses match the one-piece run step for step."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, GPT2Config, GPT2LMHeadModel, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import INLINE, losses, train
from ftcluster.data.collate import model_inputs
from ftcluster.data.template import IGNORE
from ftcluster.objectives import chunked
from ftcluster.objectives.cross_entropy import token_loss_sum
from ftcluster.objectives.logprobs import model_labelled_logps, pair_logps

# The tiny model's shape (ftcluster/assets/models/tiny/config.json), with a vocabulary whose size is not a
# round number.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=331, max_position_embeddings=256, pad_token_id=2)
CHUNK = 7  # divides none of the label counts below


def llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tied, attn_implementation="eager"))


def lora(targets: list[str]):
    from peft import LoraConfig, get_peft_model

    # Random B (init_lora_weights=False): every adapter weight gets a gradient that is not zero.
    return get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def prompt_tuning():
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def gemma_softcapped() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(**SHAPE, final_logit_softcapping=2.0, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


def batch(rows: int = 3, width: int = 23) -> dict:
    """Padded rows whose prompts, padding and one whole row are unlabelled, plus bookkeeping keys."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, SHAPE["vocab_size"], (rows, width), generator=generator)
    labels = input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    labels[:, :5] = IGNORE  # prompt
    labels[0, -4:], attention_mask[0, -4:] = IGNORE, 0  # padding
    labels[1] = IGNORE  # a row with nothing to score
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "num_tokens": torch.tensor(int(attention_mask.sum())), "num_examples": torch.tensor(rows)}


def full_logits(model, mb: dict) -> torch.Tensor:
    """The model's own logits at the labels' positions (prompt tuning prepends virtual tokens), in fp32."""
    return model(**model_inputs(mb, "cpu"), use_cache=False).logits[:, -mb["labels"].shape[1]:].float()


def full_logits_loss(model, mb: dict) -> torch.Tensor:
    targets = F.pad(mb["labels"][:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(full_logits(model, mb).flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def full_logits_logps(model, mb: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    labels = mb["labels"][:, 1:]
    logps = torch.log_softmax(full_logits(model, mb)[:, :-1] / temperature, dim=-1)
    mask = labels != IGNORE
    return logps.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


def value_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(model, full, chunk):
    value, grads = value_and_grads(model, full)
    chunked_value, chunked_grads = value_and_grads(model, chunk)
    assert chunked_value.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-5)
    assert grads.keys() == chunked_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


MODELS = {
    "untied": llama,
    "tied": lambda: llama(tied=True),
    "lora": lambda: lora(["q_proj", "v_proj", "down_proj"]),
    "lora_on_the_head": lambda: lora(["q_proj", "lm_head"]),
    "prompt_tuning": prompt_tuning,
    "gemma_softcapped": gemma_softcapped,
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk_tokens", [0, CHUNK])
def test_loss_matches_the_full_logits_in_value_and_gradients(name, chunk_tokens):
    model = MODELS[name]()
    assert chunked.head_of(model) is not None
    mb = batch()
    assert_same(model, lambda: full_logits_loss(model, mb), lambda: token_loss_sum(model, mb, chunk_tokens))


@pytest.mark.parametrize("name", ["untied", "tied", "lora_on_the_head", "gpt2"])
def test_logps_match_the_full_logits_in_value_and_gradients(name):
    model = gpt2() if name == "gpt2" else MODELS[name]()
    mb = batch(rows=4)
    weights = torch.linspace(-1.0, 1.0, mb["labels"].shape[1] - 1)  # a loss that weighs every position
    for temperature in (1.0, 0.7):
        def weighted(logps_and_mask):
            logps, mask = logps_and_mask
            return (logps * mask * weights).sum()

        for chunk_tokens in (0, CHUNK):
            assert_same(model, lambda: weighted(full_logits_logps(model, mb, temperature)),
                        lambda: weighted(model_labelled_logps(model, mb, temperature, chunk_tokens)))
    full, chunk = pair_logps(model, mb), pair_logps(model, mb, chunk_tokens=CHUNK)
    for side in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(chunk, side), getattr(full, side), rtol=1e-5, atol=1e-5)


def test_a_batch_with_no_label_gives_zero_and_zero_gradients_on_every_parameter():
    # Every rank must produce gradients for the same parameters, or ZeRO's reduction waits forever.
    model = llama()
    mb = batch()
    mb["labels"][:] = IGNORE
    loss, grads = value_and_grads(model, lambda: token_loss_sum(model, mb, chunk_tokens=CHUNK))
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads.values()) and grads.keys() == dict(model.named_parameters()).keys()


def test_chunks_keep_no_logits_for_backward_and_one_piece_only_the_labelled_ones():
    # What the graph saves for backward, weights aside: nothing of vocabulary width in chunks; in one piece,
    # only the labelled positions' logits (the full logits' cross-entropy saves all rows x width of them).
    model = llama()
    mb = batch()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_activations(loss):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss()
        return [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in weights]

    vocab_wide = lambda shapes: {s for s in shapes if SHAPE["vocab_size"] in s}
    labelled = int((mb["labels"][:, 1:] != IGNORE).sum())
    assert (3 * 23, SHAPE["vocab_size"]) in vocab_wide(saved_activations(lambda: full_logits_loss(model, mb)))
    assert vocab_wide(saved_activations(lambda: token_loss_sum(model, mb, 0))) == {(labelled, SHAPE["vocab_size"])}
    assert not vocab_wide(saved_activations(lambda: token_loss_sum(model, mb, CHUNK)))


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=SHAPE["vocab_size"], bos_token_id=1,
                                      eos_token_id=1)).eval()  # eval: no dropout


def test_model_families_with_unknown_logit_processing_take_the_full_logits():
    model = gpt2()
    assert chunked.head_of(model) is None
    mb = batch()
    assert token_loss_sum(model, mb, chunk_tokens=CHUNK).item() == token_loss_sum(model, mb).item()
    assert token_loss_sum(model, mb).item() == pytest.approx(full_logits_loss(model, mb).item(), rel=1e-6)


def test_every_model_input_reaches_the_model_and_bookkeeping_does_not():
    # Flattened packing adds flash-attention keys; the loss must not keep to a fixed list.
    inputs = model_inputs({"input_ids": torch.ones(1, 3), "cu_seq_lens_q": torch.tensor([0, 3]),
                                   "max_length_q": 3, "labels": torch.ones(1, 3), "num_tokens": 3,
                                   "num_examples": 1, "margin": torch.zeros(1), "row_index": torch.zeros(1)}, "cpu")
    assert set(inputs) == {"input_ids", "cu_seq_lens_q", "max_length_q"}


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_sft_losses_in_chunks_match_the_one_piece_run_step_for_step(tmp_path, strategy):
    # Through the DeepSpeed engine; under ZeRO-3 the head's weight is partitioned and gathered by its hooks,
    # also in the backward recompute. 64 label tokens per chunk: several chunks per micro-batch. (The one-piece
    # default against the full logits of a plain torch loop: test_train_distributed.py's reference runs.)
    common = [*INLINE, f"strategy={strategy}", "trainer.max_steps=3", "trainer.global_batch=4"]
    train(tmp_path / "full", *common)
    train(tmp_path / "chunked", *common, "trainer.loss_chunk_tokens=64")
    full, chunk = losses(tmp_path / "full"), losses(tmp_path / "chunked")
    assert len(full) == 3 and list(chunk) == list(full)
    assert [chunk[s] for s in chunk] == pytest.approx([full[s] for s in full], rel=1e-5, abs=1e-5)
