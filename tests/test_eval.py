"""Text metrics against sacrebleu, rouge-score and hand arithmetic; generation metrics during training;
`ftcluster eval` on a tiny run (report sections, values consistent with what training logged and with the
saved outputs); bad input refused before any model loads."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from helpers import INLINE, refused, train
from ftcluster.cli import main
from ftcluster.eval.scores import METRICS, compute
from ftcluster.observe.track import read_metrics

# ---- metrics on fixed strings ---------------------------------------------------------------------------

PREDICTIONS = ["Paris", "  the Eiffel Tower ", "blue green red", "", ""]
REFERENCES = ["Paris", "Eiffel tower.", "red yellow", "", "Rome"]


def test_exact_match_accuracy_and_token_overlap_by_hand():
    got = compute(["exact_match", "accuracy", "token_precision", "token_recall", "token_f1"], PREDICTIONS, REFERENCES)
    # exact (whitespace stripped): Paris, and the empty answer to the empty reference: 2 of 5.
    assert got["exact_match"] == pytest.approx(2 / 5)
    # normalised (case, punctuation, articles): "the Eiffel Tower" == "Eiffel tower." as well: 3 of 5.
    assert got["accuracy"] == pytest.approx(3 / 5)
    # per example (P, R): (1, 1), (1, 1), blue green red vs red yellow: 1 shared token -> (1/3, 1/2),
    # both empty -> (1, 1), empty vs Rome -> (0, 0). F1 of the third: 2 * 1/3 * 1/2 / (1/3 + 1/2) = 0.4.
    assert got["token_precision"] == pytest.approx((1 + 1 + 1 / 3 + 1 + 0) / 5)
    assert got["token_recall"] == pytest.approx((1 + 1 + 1 / 2 + 1 + 0) / 5)
    assert got["token_f1"] == pytest.approx((1 + 1 + 0.4 + 1 + 0) / 5)


def test_json_validity_and_field_accuracy_by_hand():
    reference = '{"name":"Irene","age":26,"city":"Sydney"}'
    predictions = [reference,                                               # valid, 3 of 3 fields
                   '{\n  "name": "Irene",\n  "age": 62,\n  "city": "Sydney"\n}',  # valid, 2 of 3
                   '{"name": "Irene", "city": null}',                         # valid, 1 of 3 (age missing)
                   "[1, 2]",                                                # valid (an array), not an object: 0
                   'Here is the JSON: {"name":"Irene"}',                    # not JSON: 0
                   "42"]                                                    # a bare number is not structured: 0
    got = compute(["json_valid", "json_field_accuracy"], predictions, [reference] * 6)
    assert got["json_valid"] == pytest.approx(4 / 6)
    assert got["json_field_accuracy"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 0 + 0 + 0) / 6)


def test_bleu_is_sacrebleu_corpus_bleu():
    predictions = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi"]
    references = ["the cat sat on a mat", "the quick brown fox jumped over", "hello there"]
    got = compute(["bleu"], predictions, references)["bleu"]
    assert got == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-9)
    # A corpus statistic, not the mean of sentence scores (which differ here).
    sentence_mean = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)) / 3
    assert abs(got - sentence_mean) > 1
    assert compute(["bleu"], ["the same words here"], ["the same words here"])["bleu"] == pytest.approx(100)


def test_rouge_is_rouge_score_with_stemming():
    predictions = ["the cats sat on the mat", "police killed the gunman", "nothing in common"]
    references = ["the cat sat on a mat", "the gunman was shot down by police", "entirely different words"]
    got = compute(["rouge1", "rouge2", "rougeL"], predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [scorer.score(r, p) for p, r in zip(predictions, references)]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert got[name] == pytest.approx(sum(s[name].fmeasure for s in expected) / 3, abs=1e-12)
    # By hand for the first pair (6 tokens each, cats stemmed to cat): unigrams shared the, cat, sat, on, mat
    # -> 5/6; bigrams shared "the cat", "cat sat", "sat on" of 5 -> 3/5; LCS the cat sat on mat -> 5/6.
    first = compute(["rouge1", "rouge2", "rougeL"], predictions[:1], references[:1])
    assert (first["rouge1"], first["rouge2"], first["rougeL"]) == pytest.approx((5 / 6, 3 / 5, 5 / 6))


def test_the_bundled_general_text_is_the_default_and_reproducible(tmp_path):
    from ftcluster.config import compose
    from ftcluster.eval.command import general_documents

    assert Path(compose([]).eval.general) == ASSETS / "general" / "general.jsonl"
    shutil.copy(ASSETS / "general" / "generate.py", tmp_path / "generate.py")
    subprocess.run([sys.executable, str(tmp_path / "generate.py")], check=True, capture_output=True)
    assert (tmp_path / "general.jsonl").read_bytes() == (ASSETS / "general" / "general.jsonl").read_bytes()
    documents = general_documents(str(tmp_path / "general.jsonl"))
    assert len(documents) == 60 and sum(d.count(". ") + 1 for d in documents) == 300


# ---- during training and `ftcluster eval` on a tiny run ---------------------------------------------------

GENERATION = ["trainer.eval_generate=true", "trainer.eval_generate_every_steps=1", "trainer.eval_max_new_tokens=8",
              "trainer.eval_metrics=[exact_match,token_f1,bleu,json_valid]"]
HELD_OUT = 12  # of the bundled eval split: generation is what costs time
ASSETS = Path(__file__).resolve().parents[1] / "ftcluster" / "assets" / "data"
GENERAL = 8  # paragraphs of the bundled general text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    for name, source, lines in (("eval.jsonl", ASSETS / "json_extract" / "eval.jsonl", HELD_OUT),
                                ("general.jsonl", ASSETS / "general" / "general.jsonl", GENERAL)):
        (root / name).write_text("".join(source.read_text().splitlines(keepends=True)[:lines]))
    train(root / "run", *INLINE, "trainer.max_steps=2", "trainer.global_batch=4",
          f"data.eval_path={root / 'eval.jsonl'}", *GENERATION)
    return root / "run"


@pytest.fixture(scope="module")
def evaluated(tiny_run) -> Path:
    """`ftcluster eval` on the run's final/ against its starting weights (the default baseline), generating
    as training did (8 new tokens, one batch of up to 32 prompts), on the run's own data (no data key given)."""
    out = tiny_run.parent / "eval_out"
    assert main(["eval", f"eval.model={tiny_run}/final", "launcher.workers=1", "eval.max_new_tokens=8",
                 "eval.batch_size=32", f"eval.general={tiny_run.parent / 'general.jsonl'}",
                 f"eval.output_dir={out}"]) == 0
    return out


def test_training_logs_generation_metrics(tiny_run):
    rows = [r for r in read_metrics(tiny_run) if "eval_exact_match" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert 0 <= row["eval_token_f1"] <= 1 and 0 <= row["eval_bleu"] <= 100 and 0 <= row["eval_json_valid"] <= 1


def test_eval_report_on_the_tiny_run(tiny_run, evaluated):
    summary = json.loads((evaluated / "eval.json").read_text())
    tuned, base = summary["models"]["tuned"], summary["models"]["base"]
    assert base["spec"] == str(tiny_run / "init_model") and tuned["kind"] == base["kind"] == "folder"
    logged = {r["step"]: r for r in read_metrics(tiny_run) if "eval_loss" in r}
    # The same eval split, encoded alike: perplexity is exp of the loss training logged with these weights
    # (the starting ones at step 0, the final ones at step 2).
    assert tuned["perplexity"] == pytest.approx(math.exp(logged[2]["eval_loss"]), rel=1e-5)
    assert base["perplexity"] == pytest.approx(math.exp(logged[0]["eval_loss"]), rel=1e-5)
    # The same greedy answers as training's generation eval, so the same scores.
    for step, entry in ((2, tuned), (0, base)):
        for name in ("exact_match", "token_f1", "bleu", "json_valid"):
            assert entry["metrics"][name] == pytest.approx(logged[step][f"eval_{name}"], abs=1e-9), (step, name)
    assert list(tuned["metrics"]) == list(METRICS) and tuned["examples"] == summary["data"]["prompts"] == HELD_OUT

    outputs = [json.loads(line) for line in (evaluated / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == HELD_OUT
    for role, entry in (("tuned", tuned), ("base", base)):
        exact = sum(o[role].strip() == o["reference"].strip() for o in outputs) / HELD_OUT
        assert entry["metrics"]["exact_match"] == exact
        bleu = sacrebleu.corpus_bleu([o[role] for o in outputs], [[o["reference"] for o in outputs]]).score
        assert entry["metrics"]["bleu"] == pytest.approx(bleu)

    forgetting = summary["forgetting"]
    assert summary["general"]["documents"] == GENERAL and summary["general"]["tokens"] > 100 * GENERAL
    assert forgetting["general_perplexity_before"] == base["general_perplexity"] > 1
    assert forgetting["ratio"] == pytest.approx(tuned["general_perplexity"] / base["general_perplexity"])

    report = (evaluated / "eval.md").read_text()
    for section in ("# Evaluation: ", "## Metrics", "| metric | base | tuned | delta |", "## Forgetting",
                    "| general perplexity |", "## Examples where base and tuned differ"):
        assert section in report, section
    for name in ("perplexity", *METRICS):
        assert f"\n| {name} | " in report, name
    differing = sum(o["base"].strip() != o["tuned"].strip() for o in outputs)
    assert f"{differing} of {HELD_OUT} answers differ" in report
    assert report.count("### Example ") == min(differing, 5)


def test_a_checkpoint_scores_like_final(tiny_run, tmp_path):
    """checkpoints/step-2 is exported to a folder first; it holds the weights final/ holds."""
    assert main(["eval", f"eval.model={tiny_run}/checkpoints/step-2", "launcher.workers=1", "eval.metrics=[]",
                 "eval.baseline=null", "eval.general=null", f"eval.output_dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    logged = [r for r in read_metrics(tiny_run) if r["step"] == 2 and "eval_loss" in r][0]
    assert summary["models"]["tuned"]["kind"] == "checkpoint" and list(summary["models"]) == ["tuned"]
    assert summary["models"]["tuned"]["perplexity"] == pytest.approx(math.exp(logged["eval_loss"]), rel=1e-5)
    report = (tmp_path / "eval.md").read_text()
    assert "| metric | tuned |" in report and "Not measured: eval.general=null." in report
    assert "No answers were generated (eval.metrics=[])." in report


def test_eval_reuses_the_runs_prepared_set_without_tokenizing(tiny_run, evaluated, tmp_path, capsys, monkeypatch):
    """The run's own data (no data key given) with final/'s tokenizer is the run's prepared set: eval links it
    and says so, and tokenizes nothing. The general text's rows stay in eval's own folder, out of the store."""
    assert (evaluated / "data" / "tuned").resolve() == (tiny_run / "data").resolve()
    assert (evaluated / "data" / "tuned-general" / "state.json").is_file()
    assert not (tiny_run / "data" / "general").exists()  # nothing written into the set other runs share

    import ftcluster.data.shards as shards

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("eval tokenized the eval split again")

    monkeypatch.setattr(shards, "encode_records", no_tokenizing)
    assert main(["eval", f"eval.model={tiny_run}/final", "launcher.workers=1", "eval.metrics=[]",
                 "eval.baseline=null", "eval.general=null", f"eval.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "reusing the prepared set" in out and "eval tuned: eval split of" in out
    assert "(reused, no tokenization)" in out
    assert (tmp_path / "data" / "tuned").resolve() == (tiny_run / "data").resolve()


def test_what_a_spec_names(tmp_path):
    """From files alone: an unmerged final/ means its adapter on the base weights beside it; the baseline of
    a random-init run is its init_model/; an adapter's base comes from adapter_config.json."""
    from ftcluster.config import compose, to_yaml
    from ftcluster.eval.targets import default_baseline, resolve

    tiny = Path(__file__).resolve().parents[1] / "ftcluster" / "assets" / "models" / "tiny"
    run = tmp_path / "run"
    for folder in (run / "final", run / "init_model"):
        folder.mkdir(parents=True)
        shutil.copy(tiny / "config.json", folder / "config.json")
    (run / "config.yaml").write_text(to_yaml(compose(["model=tiny", "peft=lora", "export.merge=false"])))
    (run / "manifest.json").write_text("{}")
    (run / "final" / "adapter").mkdir()
    (run / "final" / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(run / "final")}))
    target = resolve(str(run), "eval.model")
    assert (target.kind, target.path, target.base) == ("adapter", str(run / "final" / "adapter"), str(run / "final"))
    assert default_baseline(target) == str(run / "init_model")
    adapter = resolve(str(run / "final" / "adapter"), "eval.baseline")
    assert (adapter.kind, adapter.base, adapter.run_dir) == ("adapter", str(run / "final"), str(run.resolve()))
    assert resolve("tiny", "eval.model").kind == "random" and resolve("smollm2", "eval.model").kind == "bundled"


# ---- bad input: one message naming the key, nothing loaded ------------------------------------------------

def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    err = refused(capsys, "eval", f"eval.model={tmp_path}", f"eval.output_dir={tmp_path / 'out'}")
    assert "'eval.model'" in err and "is not a model folder" in err and "config.json" in err
    assert "'eval.model'" in refused(capsys, "eval", f"eval.model={tmp_path / 'missing'}")
    assert not (tmp_path / "out").exists()


def test_generation_metrics_on_text_data_are_refused(tmp_path, capsys):
    text = tmp_path / "notes.jsonl"
    text.write_text('{"text": "Plain prose without any answer."}\n' * 3)
    data = ["data=custom", f"data.path={text}", f"data.eval_path={text}", "data.format=text"]
    err = refused(capsys, "eval", "eval.model=tiny", *data, f"eval.output_dir={tmp_path / 'out'}")
    assert "'eval.metrics'" in err and str(text) in err and "eval.metrics=[]" in err
    assert not (tmp_path / "out").exists()


def test_json_field_accuracy_needs_json_references(tmp_path, capsys):
    records = tmp_path / "qa.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("hi", "yo")))
    data = ["data=custom", f"data.path={records}", f"data.eval_path={records}", "data.format=alpaca"]
    err = refused(capsys, "eval", "eval.model=tiny", *data, f"eval.output_dir={tmp_path / 'out'}")
    assert "'eval.metrics'" in err and "json_field_accuracy" in err and "'hi'" in err
    assert not (tmp_path / "out").exists()


def test_a_reward_model_is_refused(tmp_path, capsys):
    config = json.loads((Path(__file__).resolve().parents[1] / "ftcluster/assets/models/tiny/config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    err = refused(capsys, "eval", f"eval.model={tmp_path}")
    assert "'eval.model'" in err and "LlamaForSequenceClassification" in err


def test_unknown_metric_names_are_refused(capsys):
    assert "unknown metric" in refused(capsys, "eval", "eval.model=tiny", "eval.metrics=[exact_match,meteor]")
    assert "'trainer.eval_metrics'" in refused(capsys, "config", "model=tiny", "trainer.eval_metrics=[blue]")
