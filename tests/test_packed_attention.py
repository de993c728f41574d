"""Packed micro-batches flattened to [1, ΣL] with example boundaries, and the attention that reads them:
per-example sdpa (ftcluster.train.attention) and flash-attention's varlen path, checked on the tiny model in
fp32 against each example run alone."""

import random

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening

from helpers import as_rows
from ftcluster.config import ASSETS
from ftcluster.data.collate import collate, model_inputs
from ftcluster.data.loader import GlobalBatchLoader
from ftcluster.data.packing import pack, unpacked
from ftcluster.data.prepare import FEATURES
from ftcluster.data.template import IGNORE
from ftcluster.objectives.cross_entropy import token_loss_sum
from ftcluster.train import attention
from ftcluster.train.attention import VARLEN_SDPA

TINY = ASSETS / "models" / "tiny"


def examples(count, lengths=(2, 60), seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(3, 1000) for _ in range(rng.randint(*lengths))]
        out.append((ids, [IGNORE] + ids[1:]))
    return out


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY)).state_dict()


def tiny(weights, attn):
    attention.register()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation=attn)
    model.load_state_dict(weights)
    return model.eval()


def token_losses(model, batch):
    """Next-token cross-entropy at every position of every row, [rows, L-1] (0 where the label is ignored)."""
    logits = model(**model_inputs(batch, "cpu"), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")


def alone(model, example):
    ids, labels = example
    return token_losses(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}).sum()


def per_example(model, batch):
    """Each example's summed loss in a flattened batch: positions a..b-2 predict the labels a+1..b-1."""
    losses, bounds = token_losses(model, batch)[0], batch["cu_seq_lens_q"].tolist()
    return [losses[a:b - 1].sum() for a, b in zip(bounds, bounds[1:])]


def test_flattened_batch_marks_every_example_of_the_rows():
    data = examples(30)
    rows = pack(data, 128)[:3]
    batch = collate(rows, pad_id=0, packed=True)
    bounds = batch["cu_seq_lens_q"]
    assert bounds.dtype == torch.int32 and bounds is batch["cu_seq_lens_k"]
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    assert ids == sum((row["input_ids"] for row in rows), []) and batch["input_ids"].shape[0] == 1
    segments = list(zip(bounds.tolist(), bounds.tolist()[1:]))
    assert len(segments) == int(batch["num_examples"]) == sum(row["num_examples"] for row in rows)
    assert int(batch["num_tokens"]) == len(ids) == sum(len(row["input_ids"]) for row in rows)
    assert batch["max_length_q"] == batch["max_length_k"] == max(b - a for a, b in segments)
    assert isinstance(batch["max_length_q"], int)
    by_tokens = {tuple(x): lab for x, lab in data}
    for a, b in segments:
        assert positions[a:b] == list(range(b - a))
        assert labels[a:b] == by_tokens[tuple(ids[a:b])]  # first label ignored, the rest kept
    assert sum(x != IGNORE for x in labels) == sum(x != IGNORE for row in rows for x in row["labels"])


def test_flattened_batch_is_what_transformers_collator_makes():
    data = examples(5)
    ours = collate(unpacked(data), pad_id=0, packed=True)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": ids, "labels": labels} for ids, labels in data])
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype and ours[key].equal(value), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("attn", [VARLEN_SDPA, "sdpa", "eager"])
def test_each_example_loses_what_it_loses_alone(weights, attn):
    model = tiny(weights, attn)
    data = examples(12)
    rows = pack(data, 120)
    with torch.no_grad():
        for k in range(0, len(rows), 2):  # micro-batches of 2 rows
            batch = collate(rows[k:k + 2], pad_id=0, packed=True)
            ids = batch["input_ids"][0].tolist()
            for (a, b), loss in zip(zip(batch["cu_seq_lens_q"].tolist(), batch["cu_seq_lens_q"].tolist()[1:]),
                                    per_example(model, batch)):
                example = next(e for e in data if e[0] == ids[a:b])
                torch.testing.assert_close(loss, alone(model, example), rtol=1e-5, atol=1e-5)


def test_per_example_sdpa_builds_no_mask_and_runs_causal_per_example(weights, monkeypatch):
    model = tiny(weights, VARLEN_SDPA)
    batch = collate(pack(examples(12), 128)[:2], pad_id=0, packed=True)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((q.shape[2], kw)) or real(q, k, v, **kw))
    with torch.no_grad():
        token_losses(model, batch)
    lengths = torch.diff(batch["cu_seq_lens_q"]).tolist()
    assert [n for n, _ in calls] == lengths * model.config.num_hidden_layers
    assert all(kw["is_causal"] and kw.get("attn_mask") is None for _, kw in calls)


def test_position_ids_alone_still_keep_examples_apart(weights):
    # A caller that forwards only input_ids and position_ids (no cu_seq_lens): boundaries from the restarts.
    model = tiny(weights, VARLEN_SDPA)
    batch = collate(pack(examples(16), 128)[:2], pad_id=0, packed=True)
    bare = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(token_losses(model, bare), token_losses(model, batch), rtol=1e-5, atol=1e-6)


def test_padded_batches_and_generation_run_as_plain_sdpa(weights):
    varlen, sdpa = tiny(weights, VARLEN_SDPA), tiny(weights, "sdpa")
    batch = collate(unpacked(examples(4)), pad_id=0, packed=False)
    with torch.no_grad():
        torch.testing.assert_close(token_losses(varlen, batch), token_losses(sdpa, batch), rtol=1e-5, atol=1e-6)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left-padded, as generation pads
    mask = (prompts != 0).long()
    out = [m.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
           for m in (varlen, sdpa)]
    assert out[0].equal(out[1])


def test_sft_losses_over_steps_match_the_padded_masked_path(weights):
    """A few AdamW steps on the mean loss over label tokens: flattened packed micro-batches under per-example
    sdpa against one padded batch of the same examples with an attention mask under sdpa."""
    data = examples(32, lengths=(5, 90), seed=1)
    runs = {}
    for name, attn in (("padded", "sdpa"), ("flattened", VARLEN_SDPA)):
        model = tiny(weights, attn).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs[name] = []
        for step in range(4):
            chunk = data[step * 8:(step + 1) * 8]
            if name == "padded":
                batches = [collate(unpacked(chunk), pad_id=0, packed=False)]
            else:
                rows = pack(chunk, 192)
                batches = [collate(rows[k:k + 2], pad_id=0, packed=True) for k in range(0, len(rows), 2)]
            count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            total = sum(token_losses(model, b).sum() for b in batches) / count
            total.backward()
            opt.step()
            opt.zero_grad()
            runs[name].append(total.item())
    assert runs["flattened"] == pytest.approx(runs["padded"], rel=1e-5)


def test_two_rows_per_micro_batch_lose_what_one_row_does(weights, tmp_path):
    """Through the loader and the loss function as training calls them: micro-batch 2 against micro-batch 1,
    same global batch, summed loss and gradients."""
    rows = pack(examples(40, lengths=(5, 70), seed=2), 128)[:8]
    table = as_rows(datasets.Dataset.from_list(rows, features=FEATURES))
    results = []
    for micro in (1, 2):
        model = tiny(weights, VARLEN_SDPA).train()
        loader = GlobalBatchLoader(table, global_batch=8, micro_batch=micro, rank=0, world_size=1, seed=0,
                                   shuffle=True, pad_id=0, packed=True)
        loss = sum(token_loss_sum(model, mb) for mb in loader.micro_batches(0))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for one, two in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)


# ---- flash_attention_2, with a CPU stand-in for the kernels ------------------------------------------------

class StandInFlash:
    """flash_attn's dense and varlen functions in [tokens, heads, dim] layout, computed by sdpa on the CPU,
    recording which one transformers called."""

    def __init__(self):
        self.calls = []

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **_):
        self.calls.append(("dense", None))
        return self._sdpa(q, k, v, softmax_scale, causal)

    @staticmethod
    def _sdpa(q, k, v, scale, causal):
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal, scale=scale,
                                             enable_gqa=True)
        return out.transpose(1, 2)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=True, **_):
        self.calls.append(("varlen", (cu_seqlens_q.tolist(), max_seqlen_q)))
        bounds = cu_seqlens_q.tolist()
        return torch.cat([self._sdpa(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
                          for a, b in zip(bounds, bounds[1:])])

    def imports(self, implementation, *args, **kwargs):
        process = lambda **kw: {"max_seqlen_q": kw.get("max_seqlen_q"), "max_seqlen_k": kw.get("max_seqlen_k"),
                                "causal": kw["is_causal"], "softmax_scale": kw.get("softmax_scale")}
        return (self.dense, self.varlen, None, None, None), (process, dict)


def test_flash_attention_takes_its_varlen_path_with_two_rows_per_micro_batch(weights, monkeypatch):
    kernels = StandInFlash()
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", kernels.imports)
    model = tiny(weights, "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # flash_attn is not installed: kernels above
    rows = pack(examples(20), 128)[:2]
    flat = collate(rows, pad_id=0, packed=True)
    with torch.no_grad():
        per = per_example(model, flat)
        varlen_calls = [c for c in kernels.calls if c[0] == "varlen"]
        assert len(varlen_calls) == len(kernels.calls) == model.config.num_hidden_layers
        assert varlen_calls[0][1] == (flat["cu_seq_lens_q"].tolist(), flat["max_length_q"])
        ids = flat["input_ids"][0].tolist()
        bounds = flat["cu_seq_lens_q"].tolist()
        for (a, b), loss in zip(zip(bounds, bounds[1:]), per):
            example = (ids[a:b], [IGNORE] + ids[a + 1:b])
            torch.testing.assert_close(loss, alone(model, example), rtol=1e-5, atol=1e-5)

        # The layout before flattening: two padded rows, position ids only. transformers infers boundaries
        # only at batch size 1, so it runs the dense kernel and the examples see each other (issue 20, point 3).
        width = max(len(r["input_ids"]) for r in rows)
        old = {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
               "position_ids": torch.tensor([[p for n in r["example_lengths"] for p in range(n)]
                                             + list(range(width - len(r["input_ids"]))) for r in rows])}
        kernels.calls.clear()
        model(**old, use_cache=False)
        assert {c[0] for c in kernels.calls} == {"dense"}


def test_packing_under_sdpa_selects_per_example_sdpa():
    config = AutoConfig.from_pretrained(TINY)
    assert attention.attn_implementation("sdpa", True, config) == VARLEN_SDPA
    assert attention.attn_implementation("sdpa", False, config) == "sdpa"
    assert attention.attn_implementation("flash_attention_2", True, config) == "flash_attention_2"
    assert attention.attn_implementation("eager", True, config) == "eager"
    config.sliding_window = 64  # a window the per-example call would ignore
    assert attention.attn_implementation("sdpa", True, config) == "sdpa"


def test_load_model_wires_per_example_sdpa_and_final_config_stays_portable(tmp_path):
    from ftcluster.config import compose
    from ftcluster.train import model as model_loading
    from ftcluster.train.random_init import materialize_random_init

    folder = materialize_random_init(str(TINY), tmp_path / "init", 0)
    packed = model_loading.load_model(compose(["model=tiny", "peft=none", "strategy.precision=fp32"]), folder)
    assert packed.config._attn_implementation == VARLEN_SDPA
    plain = model_loading.load_model(compose(["model=tiny", "peft=none", "strategy.precision=fp32",
                                              "data.packing=false"]), folder)
    assert plain.config._attn_implementation == "sdpa"
    packed.save_pretrained(tmp_path / "saved")
    assert VARLEN_SDPA not in (tmp_path / "saved" / "config.json").read_text()
