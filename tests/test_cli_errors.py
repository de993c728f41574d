"""Every bad input gets one clear message naming the key or file:line, a non-zero exit, no traceback,
and nothing launched. These run the CLI's main() in process, and the real console script once."""

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest

from helpers import INLINE, TINY, cli, own_stderr
from ftcluster.cli import main


def run_cli(capsys, *overrides):
    code = main(["train", *TINY, *overrides])
    return code, own_stderr(capsys)


def data_cli(capsys, *overrides):
    """run_cli for a run its data refuses, under launcher=inline: the refusal comes before the launch, the same
    under every launcher, and inline starts no cluster meanwhile that the refusal would wait for (seconds each).
    launcher=local's early cluster and its end on a bad record have their own test below."""
    return run_cli(capsys, *INLINE, *overrides)


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


GOOD = {"instruction": "Say hi.", "output": "hi"}


@pytest.mark.parametrize("override, expected", [
    (["strategy.zero_stage=5"], "'strategy.zero_stage': got 5; it must be 0, 1, 2 or 3"),
    (["trainer.global_batch=6"], "'trainer.global_batch': 6 is not divisible by trainer.micro_batch_per_device x launcher.workers = 2 x 2 = 4"),
    (["launcher.workers=64"], "'launcher.workers': 64 workers"),
    (["trainer.no_such_key=1"], "trainer.no_such_key"),
    (["trainer.max_steps=many"], "'trainer.max_steps'"),
    (["strategy=zero9"], "config group 'strategy' has no option 'zero9'; available: zero0, zero1"),
    (["data.path=/nonexistent/train.jsonl"], "'data.path': /nonexistent/train.jsonl does not exist"),
    (["peft=qlora"], "'peft.method': QLoRA quantizes with bitsandbytes, which needs a CUDA GPU"),
    (["data.format=preference"], "'data.format': stage=sft trains on alpaca, chat, text data"),
    (["model.attn_implementation=flash_attention_2", "strategy.precision=bf16"], "flash-attn"),
    (["model.attn_implementation=flash_attention_2"], "runs in bf16 or fp16, but strategy.precision=fp32"),
    (["launcher=processes", "stage=grpo"], "'launcher.name': stage=grpo places one Ray actor group per role"),
    (["launcher=processes", "launcher.max_failures=2"], "'launcher.max_failures': got 2; launcher=processes does not"),
])
def test_config_errors(capsys, tmp_path, override, expected):
    code, err = run_cli(capsys, *override, f"output_dir={tmp_path}/run")
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.parametrize("records, fmt, expected", [
    ([GOOD, '{"instruction": "x", "output": ', GOOD], "alpaca", "bad.jsonl:2: invalid JSON"),
    ([GOOD, {"instruction": "x"}], "alpaca", "bad.jsonl:2: record has no 'output' field"),
    ([GOOD, GOOD, {"instruction": "x", "output": 3}], "alpaca", "bad.jsonl:3: field 'output' must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "chat", "bad.jsonl:1:"),
    ([], "alpaca", "bad.jsonl"),
])
def test_data_errors_name_file_and_line(capsys, tmp_path, records, fmt, expected):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    code, err = data_cli(capsys, f"data.path={data}", "data.eval_path=null", f"data.format={fmt}",
                         f"output_dir={tmp_path}/run")
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_chat_without_assistant_turn_is_explained(capsys, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    code, err = data_cli(capsys, f"data.path={data}", "data.eval_path=null", "data.format=chat",
                         f"output_dir={tmp_path}/run")
    assert code == 2 and "assistant" in err


def test_too_long_examples_error_or_are_dropped_and_counted(capsys, tmp_path):
    long = {"instruction": "word " * 400, "output": "ok"}
    data = write_jsonl(tmp_path / "long.jsonl", [GOOD, long])
    code, err = data_cli(capsys, f"data.path={data}", "data.eval_path=null", "data.format=alpaca",
                         "data.truncation=error", f"output_dir={tmp_path}/run")
    assert code == 2 and "long.jsonl:2" in err and "trainer.max_seq_len" in err

    from ftcluster.config import compose
    from ftcluster.data.prepare import prepare
    from ftcluster.train.tokenizer import load_tokenizer

    cfg = compose([*TINY, f"data.path={data}", "data.eval_path=null", "data.format=alpaca", "data.truncation=drop",
                   "trainer.micro_batch_per_device=1", "trainer.global_batch=1", "launcher.workers=1"])
    stats = prepare(cfg, load_tokenizer(cfg.model.path), tmp_path / "prepared")
    assert stats["train"]["dropped"] == 1 and stats["train"]["examples"] == 1


def test_output_dir_with_another_run_needs_resume(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    code, err = run_cli(capsys, f"output_dir={run}")
    assert code == 2
    assert "already holds a run" in err and "resume=auto" in err
    assert (run / "config.yaml").read_text() == "seed: 0\n"


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    result = cli("train", *TINY, "strategy.zero_stage=5", f"output_dir={tmp_path}/run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ftcluster train: error: config key 'strategy.zero_stage': got 5; it must be 0, 1, 2 or 3"]


@pytest.mark.slow
def test_a_data_error_under_launcher_local_ends_the_cluster_started_meanwhile(tmp_path):
    """launcher=local starts its Ray cluster on a thread while the data is read (launch/cluster.py); a bad record
    still refuses the run with its one line, and the cluster goes with the command."""
    temp = Path(f"/tmp/ftc-early-{os.getpid()}")  # Ray's socket paths must stay short
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"instruction": 3, "output": "x"}])
    try:
        result = cli("train", *TINY, "launcher=local", "data=custom", f"data.path={data}", "data.format=alpaca",
                     f"output_dir={tmp_path / 'run'}", env={"RAY_TMPDIR": str(temp)})
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"ftcluster train: error: {data}:2: field 'instruction' must be a string, got int"]
        assert list((temp / "ray").glob("session_2*")), "no Ray cluster was started while the data was read"
        assert _processes_mentioning(str(temp)) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_data_error_in_data_prepare_ends_the_cluster_started_meanwhile(tmp_path):
    """`ftcluster data prepare` with 2 workers (3 units of records) starts its local cluster while it loads the
    tokenizer; the bad record is still its one line, and the cluster goes with the command."""
    temp = Path(f"/tmp/ftc-prep-{os.getpid()}")
    records = [GOOD] * 1100
    records[1049] = {"instruction": 3, "output": "x"}
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    try:
        result = cli("data", "prepare", *TINY, "data=custom", f"data.path={data}", "data.format=alpaca",
                     "data.prepare_workers=2", f"data.prepared_dir={tmp_path / 'store'}", env={"RAY_TMPDIR": str(temp)})
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines() == [
            f"ftcluster data: error: {data}:1050: field 'instruction' must be a string, got int"]
        assert list((temp / "ray").glob("session_2*")), "no Ray cluster was started for the 2 workers"
        assert _processes_mentioning(str(temp)) == []
        assert not any((tmp_path / "store").glob("*/stats.json")), "a refused set was left as complete"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (a Ray session's processes name its folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


PAIR = {"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"}


@pytest.mark.parametrize("records, expected", [
    ([PAIR, {**PAIR, "rejected": "hi"}], "pairs.jsonl:2: 'chosen' and 'rejected' are the same response"),
    ([{"prompt": "Say hi.", "chosen": "hi"}], "pairs.jsonl:1: record has no 'rejected' field (format=preference "
                                              "expects prompt (text or turns), chosen and rejected"),
    ([PAIR, PAIR, {**PAIR, "margin": "big"}], "pairs.jsonl:3: field 'margin' must be a number, got str"),
    ([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}],
     "pairs.jsonl:1: without a 'prompt' field, 'chosen' and 'rejected' must be whole conversations that share"),
])
def test_bad_preference_records_name_file_and_line(capsys, tmp_path, records, expected):
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    code, err = data_cli(capsys, "stage=dpo", f"data.path={data}", "data.eval_path=null", "data.format=preference",
                         f"output_dir={tmp_path}/run")
    assert code == 2 and expected in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["stage=dpo"], "'data.format': stage=dpo trains on preference data, not 'alpaca'; dpo data needs "
                    "data.format=preference records with prompt, chosen and rejected"),
    (["stage=rm", "data=json_extract_pairs", "stage.rm.margin=x"], "stage.rm.margin"),
    (["stage=grpo", "stage.rl.reward_fn=null"], "'stage.rl.reward_fn': stage=grpo needs exactly one reward"),
    (["stage=grpo", "stage.rl.reward_fn=no_such_module:fn"], "'stage.rl.reward_fn': cannot import 'no_such_module'"),
    (["stage=grpo", "stage.rl.reward_fn=ftcluster.rewards:nope"], "'ftcluster.rewards' has no function 'nope'"),
    (["stage=grpo", "stage.rl.samples_per_prompt=1"], "GRPO compares each sample with the others of its group"),
    (["stage=grpo", "trainer.global_batch=12"], "12 sequences per optimizer step do not divide a rollout of"),
    (["stage=dpo", "data=json_extract_pairs", "stage.dpo.loss=kto"], "'stage.dpo.loss': got 'kto'"),
    (["stage=grpo", "data.format=preference"], "stage=grpo trains on prompt, alpaca, chat data"),
])
def test_stage_config_errors(capsys, tmp_path, overrides, expected):
    code, err = run_cli(capsys, *overrides, f"output_dir={tmp_path}/run")
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_prompt_records_need_a_prompt(capsys, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Count to 3."}, {"question": "Count to 4."}])
    code, err = run_cli(capsys, "stage=grpo", f"data.path={data}", "data.eval_path=null", "data.format=prompt",
                        f"output_dir={tmp_path}/run")
    assert code == 2 and "prompts.jsonl:2: record has no 'prompt' field (format=prompt expects prompt" in err, err


def test_reward_model_whose_tokenizer_does_not_match(capsys, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from ftcluster.config import ASSETS

    folder = tmp_path / "rm"
    config = AutoConfig.from_pretrained(ASSETS / "models" / "tiny")
    config.architectures, config.vocab_size = ["LlamaForSequenceClassification"], 10
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS / "models" / "tiny").save_pretrained(folder)
    code, err = run_cli(capsys, "stage=ppo", "stage.rl.reward_fn=null", f"stage.rl.reward_model={folder}",
                        f"output_dir={tmp_path}/run")
    assert code == 2 and f"the tokenizer in {folder} has 1000 tokens but its model only 10 embeddings" in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()
