"""Inputs that used to pass unchecked: each is refused before launch with the key or file:line, one line, exit 2
(the CLI's main() in process, as tests/test_cli_errors.py), and a non-finite step stops a run without saving it."""

import json
import pickle
from pathlib import Path

import pytest

from helpers import INLINE, train
from test_cli_errors import run_cli, write_jsonl

GOOD = {"instruction": "Say hi.", "output": "hi"}


def refused(capsys, tmp_path, *overrides, launcher=INLINE):
    # launcher=inline by default: every refusal here comes before the launch, the same under every launcher, and
    # inline starts no cluster meanwhile that the refusal would wait for (launcher=local's early start and its end
    # on a bad record: test_cli_errors.py::test_a_data_error_under_launcher_local_ends_the_cluster_started_meanwhile).
    # The RL stages run only under a Ray launcher, which starts nothing early for them.
    code, err = run_cli(capsys, *launcher, *overrides, f"output_dir={tmp_path}/run")
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing launched
    return err


def data_refused(capsys, tmp_path, path, fmt, *overrides):
    return refused(capsys, tmp_path, f"data.path={path}", "data.eval_path=null", f"data.format={fmt}", *overrides)


# ---- 8. non-finite values --------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"), ("stage.rm.margin=nan", "stage.rm.margin"),
    ("stage.dpo.beta=inf", "stage.dpo.beta"), ("optim.betas=[0.9,nan]", "optim.betas"),
    ("strategy.gradient_clipping=nan", "strategy.gradient_clipping"), ("peft.dropout=nan", "peft.dropout"),
])
def test_non_finite_config_floats_are_refused(capsys, tmp_path, override, key):
    err = refused(capsys, tmp_path, override)
    assert f"config key '{key}'" in err and "finite" in err, err


def test_on_nonfinite_skip_is_refused_naming_the_key(capsys, tmp_path):
    err = refused(capsys, tmp_path, "trainer.on_nonfinite=skip")
    assert "config key 'trainer.on_nonfinite'" in err and "trainer.on_nonfinite=stop" in err, err


def test_non_finite_margin_in_a_preference_record(capsys, tmp_path):
    pair = {"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n" + json.dumps(pair)[:-1] + ', "margin": NaN}\n')
    err = data_refused(capsys, tmp_path, path, "preference", "stage=rm")
    assert "pairs.jsonl:2: field 'margin' is nan; it must be a finite number" in err, err


def test_non_finite_loss_stops_naming_the_step_without_saving_it(tmp_path):
    from ftcluster.errors import UserError
    from ftcluster.train.checkpoint import checkpoints_dir

    # Step 1 is finite (its update is what explodes); the weights then overflow, so step 2's loss is not.
    with pytest.raises(UserError, match=r"step 2: non-finite (loss|grad_norm)") as caught:
        train(tmp_path / "run", *INLINE, "strategy=zero0", "optim.lr=1e30", "strategy.gradient_clipping=0",
              "trainer.max_steps=4", "trainer.save_every_steps=1", "trainer.keep_last_checkpoints=5")
    assert "trainer.on_nonfinite=stop" in str(caught.value)
    saved = sorted(p.name for p in checkpoints_dir(tmp_path / "run").glob("step-*"))
    assert saved == ["step-1"], saved
    assert not (tmp_path / "run" / "final").exists()


# ---- 9. loading -----------------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_checkpoint_files_are_never_unpickled_as_code(tmp_path, zero_stage):
    import torch

    from ftcluster.errors import UserError
    from ftcluster.train import checkpoint as ckpt
    from ftcluster.train.export import checkpoint_state_dict

    marker = tmp_path / "pwned"
    state = tmp_path / "step-1" / ckpt.TAG
    state.mkdir(parents=True)
    payload = {"module": {"w": torch.zeros(1)}, "evil": _RunsCode(marker)}
    name = "mp_rank_00_model_states.pt" if zero_stage == 0 else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(payload, state / name, pickle_module=pickle)
    if zero_stage:  # zero_to_fp32 reads the model states first
        torch.save(payload, state / "mp_rank_00_model_states.pt", pickle_module=pickle)
    with pytest.raises(UserError, match=r"refusing to load it, because .* \(it names "):
        checkpoint_state_dict(tmp_path / "step-1", zero_stage)
    assert not marker.exists()


def test_trust_remote_code_reaches_every_load(monkeypatch, tmp_path):
    """model.trust_remote_code goes to the tokenizer, the model and final/'s model (write_final)."""
    import transformers
    from omegaconf import OmegaConf

    from ftcluster.config import ASSETS, compose
    from ftcluster.train import export, model

    # No model facts cached: a tokenizer whose class the facts name is loaded through that class, no AutoTokenizer.
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    seen = []
    real_tok, real_model = transformers.AutoTokenizer.from_pretrained, model.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: seen.append(("tokenizer", k.get("trust_remote_code"))) or real_tok(*a, **k))
    cfg = compose(["model=tiny", "peft=none", "model.trust_remote_code=true", "strategy.precision=fp32"])
    folder = tmp_path / "init"
    model.write_random_init(str(ASSETS / "models" / "tiny"), folder, 0, True)
    monkeypatch.setattr(model.AutoModelForCausalLM, "from_pretrained", classmethod(
        lambda cls, *a, **k: seen.append(("model", k.get("trust_remote_code"))) or real_model(*a, **k)))
    loaded = model.load_model(cfg, folder)
    export.write_final(loaded.state_dict(), cfg, folder, tmp_path / "final")
    assert seen and all(flag is True for _, flag in seen), seen
    assert {"tokenizer", "model"} <= {what for what, _ in seen}
    assert OmegaConf.select(cfg, "model.trust_remote_code") is True


# ---- 10. bad inputs -------------------------------------------------------------------------------------

def _turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


@pytest.mark.parametrize("lines, fmt, expected", [
    (['{"instruction": "a", "instruction": "b", "output": "c"}'], "alpaca",
     "bad.jsonl:1: key 'instruction' appears twice in one JSON object"),
    ([GOOD, {"instruction": "Say hi.", "output": "  "}], "alpaca", "bad.jsonl:2: field 'output' is empty"),
    ([{"messages": _turns(("user", "hi"), ("assistant", ""))}], "chat", "bad.jsonl:1: field 'messages[1].content' is empty"),
    ([{"messages": _turns(("assistant", "hi"), ("user", "hi"), ("assistant", "x"))}], "chat",
     "bad.jsonl:1: 'messages': turn 0 is assistant as the first turn"),
    ([{"messages": _turns(("user", "hi"), ("system", "be brief"), ("assistant", "x"))}], "chat",
     "bad.jsonl:1: 'messages': a system turn at position 1"),
    ([{"messages": _turns(("user", "hi"), ("user", "again"), ("assistant", "x"))}], "chat",
     "bad.jsonl:1: 'messages': turn 1 is user after a user turn"),
    ([GOOD, {"instruction": "Say hi.", "output": "hi<|im_end|>"}], "alpaca",
     "bad.jsonl:2: turn 1 (assistant) contains '<|im_end|>', a control token of this tokenizer"),
    (['{"instruction": "Say \\ud800 hi.", "output": "hi"}'], "alpaca", "bad.jsonl:1: field 'instruction' holds a lone surrogate"),
])
def test_bad_records_are_refused_with_file_and_line(capsys, tmp_path, lines, fmt, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    err = data_refused(capsys, tmp_path, path, fmt)
    assert expected in err, err


def test_records_wrapped_in_an_object_are_explained(capsys, tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [GOOD, GOOD]}, indent=2))
    err = data_refused(capsys, tmp_path, path, "alpaca")
    assert "wrapped.json:1: the file is one JSON object holding 2 records under 'data'; give the list itself" in err


def test_corrupt_parquet_names_the_file(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"instruction": ["Say hi."] * 50, "output": ["hi"] * 50}), path)
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xff" * 32  # the first column chunk: the footer still opens, reading fails
    path.write_bytes(bytes(raw))
    err = data_refused(capsys, tmp_path, path, "alpaca")
    assert str(path) in err and ("damaged" in err or "cannot read as Parquet" in err), err


@pytest.mark.parametrize("override, expected", [
    ("seed=-1", "'seed': got -1; it must be 0 or more"),
    ("optim.betas=[0.9]", "'optim.betas': got [0.9]; it must be two numbers in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "'optim.betas'"),
    ("optim.eps=0", "'optim.eps': got 0"),
    ("peft.dropout=1.0", "'peft.dropout': got 1.0; it must be in [0, 1)"),
    ("optim.min_lr_ratio=-0.1", "'optim.min_lr_ratio': got -0.1; it must be 0 or more"),
    ("peft.alpha=0", "'peft.alpha': got 0; it must be a positive integer"),
    ("strategy.gradient_clipping=-1", "'strategy.gradient_clipping': got -1"),
])
def test_bad_config_values_are_refused(capsys, tmp_path, override, expected):
    assert expected in refused(capsys, tmp_path, override)


def test_deepspeed_config_must_be_a_json_object(capsys, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    err = refused(capsys, tmp_path, f"strategy.deepspeed_config={path}")
    assert f"'strategy.deepspeed_config': {path} holds a JSON list, not an object" in err, err


def _model_folder(tmp_path, weights=True, tokenizer=True, **config_changes) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    from ftcluster.config import ASSETS

    folder = tmp_path / "model"
    config = AutoConfig.from_pretrained(ASSETS / "models" / "tiny")
    for key, value in config_changes.items():
        setattr(config, key, value)
    config.save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(ASSETS / "models" / "tiny").save_pretrained(folder)
    if weights:
        (folder / "model.safetensors").write_bytes(b"")  # only its presence is checked before launch
    return folder


@pytest.mark.parametrize("folder_kwargs, overrides, expected", [
    ({"weights": False}, [], "'model.path': {folder} has no weights"),
    ({"tokenizer": False}, [], "'model.path': {folder} has no tokenizer"),
    ({"vocab_size": 500}, [], "'model.path': the tokenizer in {folder} has 1000 tokens but the model only 500"),
    ({"max_position_embeddings": 128}, ["trainer.max_seq_len=256"],
     "'trainer.max_seq_len': got 256; the model in {folder} has 128 positions"),
])
def test_model_folders_that_cannot_train(capsys, tmp_path, folder_kwargs, overrides, expected):
    folder = _model_folder(tmp_path, **folder_kwargs)
    err = refused(capsys, tmp_path, f"model.path={folder}", "model.init=pretrained", *overrides)
    assert expected.format(folder=folder) in err, err


def test_reward_function_that_cannot_take_the_records(capsys, tmp_path):
    rewards = tmp_path / "strict.py"
    rewards.write_text("def score(prompt, completion, reference):\n    return 0.0\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Count.", "reference": "1"},
                                                    {"prompt": "Count.", "answer": "2"}])
    err = refused(capsys, tmp_path, "stage=grpo", f"stage.rl.reward_fn={rewards}:score", f"data.path={data}",
                  "data.eval_path=null", "data.format=prompt", launcher=[])
    assert "prompts.jsonl:2: stage.rl.reward_fn=" in err and "answer" in err, err


def test_wandb_online_needs_credentials(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    err = refused(capsys, tmp_path, "tracking=wandb", "tracking.wandb.mode=online")
    assert "'tracking.wandb.mode': online needs W&B credentials" in err, err
