"""`ftcluster data`: dedup, scrub, contamination, split and validate on crafted files with known answers, and
`stats` on the tiny model's tokenizer checked against what training's own data preparation counts."""

import json
from pathlib import Path

import pytest

from ftcluster.cli import main
from ftcluster.data.tools.contamination import find_contamination
from ftcluster.data.tools.dedup import SHINGLE_WORDS, find_duplicates
from ftcluster.data.tools.scrub import scrub_text
from ftcluster.data.tools.stats import summarize
from ftcluster.data.tools.text import ngrams, words

BUNDLED = Path(__file__).parent.parent / "ftcluster" / "assets" / "data" / "json_extract"

STORY = ("the lighthouse keeper climbed the spiral stairs every evening to light the great lamp while the storm "
         "rolled in from the western sea and the fishing boats hurried home before dark")
OTHER = ("a small bakery on the corner sells warm bread each morning and the owner greets every customer by name "
         "before opening the shutters at seven")


def write_lines(path: Path, lines: list[str], final_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")
    return path


def shingle_jaccard(a: str, b: str) -> float:
    sa, sb = set(ngrams(a.split(), SHINGLE_WORDS)), set(ngrams(b.split(), SHINGLE_WORDS))
    return len(sa & sb) / len(sa | sb)


def test_dedup_removes_exact_and_near_copies_and_keeps_a_merely_similar_pair(tmp_path, capsys):
    near = STORY.replace("great lamp", "bright lamp")  # one word of 31 changed
    similar = " ".join(OTHER.split()[:12] + STORY.split()[:12])  # half of OTHER: must stay
    # Hand-computed on the 3-word shingles dedup uses: 3 of 29 shingles change -> 26 / 32.
    assert shingle_jaccard(STORY, near) == pytest.approx(26 / 32)
    assert shingle_jaccard(OTHER, similar) < 0.5
    lines = [
        json.dumps({"text": STORY}),
        json.dumps({"text": OTHER}),
        json.dumps({"text": STORY.replace(" the ", " the,  ").upper()}),  # case, punctuation, spacing: exact
        json.dumps({"text": near}),
        json.dumps({"text": similar}),
        '{"text":  ' + json.dumps(OTHER) + '}',  # the same record written differently: exact
    ]
    src = write_lines(tmp_path / "in.jsonl", lines)

    result = find_duplicates([(i + 1, json.loads(line)) for i, line in enumerate(lines)], near_threshold=0.7)
    assert result.counts() == {"records": 6, "exact": 2, "near": 1, "kept": 3}
    assert [(d.line, d.of, d.kind) for d in result.removed] == [(3, 1, "exact"), (4, 1, "near"), (6, 2, "exact")]
    assert result.removed[1].similarity == pytest.approx(26 / 32, abs=0.1)  # MinHash's estimate of it

    out = tmp_path / "out" / "deduped.jsonl"
    assert main(["data", "dedup", str(src), "--out", str(out), "--near-threshold", "0.7"]) == 0
    assert out.read_bytes() == (lines[0] + "\n" + lines[1] + "\n" + lines[4] + "\n").encode()
    report = json.loads((tmp_path / "out" / "deduped.dedup.json").read_text())
    assert (report["exact"], report["near"], report["kept"]) == (2, 1, 3)
    assert [(r["line"], r["of"]) for r in report["removed"]] == [(3, 1), (4, 1), (6, 2)]
    printed = capsys.readouterr().out
    assert f"{src}:4: near duplicate of line 1" in printed
    assert "6 records: 2 exact and 1 near duplicates removed, 3 kept" in printed


SECRETS = ("Mail jane.doe+ml@example.co.uk or call (415) 555-2671 or +44 20 7946 0958. "
           "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE, token ghp_" + "a1B2" * 9 + ", "
           "key sk-proj-abcdefghijklmnopqrstuvwx1234, slack xoxb-1234567890-abcdefghij, "
           "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH, Authorization: Bearer "
           "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U, "
           "curl -H 'Authorization: Bearer abcdef0123456789abcdef' with MY_API_KEY=Zx9secretvalue42 on 10.0.0.12")
SCRUBBED = ("Mail [EMAIL] or call [PHONE] or [PHONE]. "
            "AWS_ACCESS_KEY_ID=[AWS_ACCESS_KEY], token [GITHUB_TOKEN], "
            "key [OPENAI_KEY], slack [SLACK_TOKEN], "
            "[HF_TOKEN], Authorization: Bearer "
            "[JWT], "
            "curl -H 'Authorization: Bearer [BEARER_TOKEN]' with MY_API_KEY=[API_KEY] on [IPV4]")
# Numbers that are not phone numbers, dotted runs that are not addresses, words that name secrets.
HARMLESS = ("Irene (26) was born in 1998 and moved on 2024-01-15; order 123456789 cost $1,299.99, zip 94105, "
            "version 1.2.3.4.5, 3 kids. The secret: patience. Use sk-learn. A bearer of bad news.")


def test_scrub_replaces_each_kind_and_leaves_plain_numbers(tmp_path, capsys):
    text, counts = scrub_text(SECRETS)
    assert text == SCRUBBED
    assert dict(counts) == {"email": 1, "phone": 2, "aws_access_key": 1, "github_token": 1, "openai_key": 1,
                            "slack_token": 1, "hf_token": 1, "jwt": 1, "bearer_token": 1, "api_key": 1, "ipv4": 1}
    assert scrub_text(HARMLESS) == (HARMLESS, {})

    # Every string field of the record, nested turns included; an untouched line keeps its bytes.
    untouched = '{"messages": [{"role": "user", "content": ' + json.dumps(HARMLESS) + '}],   "id": 7}'
    lines = [json.dumps({"messages": [{"role": "system", "content": "Reach ops at ops@corp.example."},
                                      {"role": "user", "content": SECRETS}], "id": 1}), untouched]
    src = write_lines(tmp_path / "chats.jsonl", lines, final_newline=False)
    out = tmp_path / "clean.jsonl"
    assert main(["data", "scrub", str(src), "--out", str(out)]) == 0
    first, second = out.read_bytes().decode().splitlines()
    assert json.loads(first) == {"messages": [{"role": "system", "content": "Reach ops at [EMAIL]."},
                                              {"role": "user", "content": SCRUBBED}], "id": 1}
    assert second == untouched
    report = json.loads((tmp_path / "clean.scrub.json").read_text())
    assert report["by_kind"]["email"] == 2 and report["by_kind"]["phone"] == 2 and report["lines_changed"] == [1]
    assert "2 records, 1 changed: jwt 1, aws_access_key 1" in capsys.readouterr().out


def test_contamination_finds_exact_and_ngram_overlap_but_not_a_shared_template():
    template = "please answer the following question now"  # in every record: no evidence of a leak
    content = [f"w{i}" for i in range(20)]
    train = [(1, {"q": template, "a": "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"}),
             (2, {"q": template, "a": " ".join(content)}),
             (3, {"q": template, "a": "one two three four five six seven eight nine ten eleven twelve"}),
             (4, {"q": template, "a": "red orange yellow green blue indigo violet black white grey pink"})]
    evals = [(1, {"question": template.upper() + "!", "answer": "One, two, three four five six seven eight nine "
                                                                "ten eleven twelve."}),  # exact after normalising
             (2, {"q": template, "a": " ".join(content[:-1] + ["changed"])}),  # last word changed
             (3, {"q": template, "a": "completely fresh words that never appear in training at all here"}),
             (4, {"q": template, "a": "solo"})]  # the template and one word: nothing of its own
    result = find_contamination(train, evals, n=5, threshold=0.5)
    # Eval line 2: 6 + 20 words -> 22 5-grams; the 2 inside the template are left out; of the other 20 only
    # the last (which holds the changed word) is missing from train: 19 / 20.
    assert [(o.eval_line, o.train_line, o.kind, o.overlap) for o in result.overlaps] == [
        (1, 3, "exact", 1.0), (2, 2, "ngram", 0.95)]
    assert result.rate == 0.5
    assert result.unchecked == 0
    # Counting the template, line 4 would be 2 of its 3 5-grams in train (0.67) and flagged.
    assert len(ngrams(words(evals[3][1]), 5)) == 3


def test_contamination_command_lists_lines_and_rate(tmp_path, capsys):
    lines = (BUNDLED / "train.jsonl").read_text().splitlines()
    evals = write_lines(tmp_path / "eval.jsonl", (BUNDLED / "eval.jsonl").read_text().splitlines()[:9] + [lines[6]])
    report = tmp_path / "c.json"
    assert main(["data", "contamination", str(BUNDLED / "train.jsonl"), str(evals), "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert f"{evals}:10: exact copy of {BUNDLED / 'train.jsonl'}:7" in printed
    assert "1 of 10 eval examples overlap train (rate 10.00%)" in printed
    assert json.loads(report.read_text())["rate"] == 0.1


def test_split_is_seeded_disjoint_and_keeps_line_bytes(tmp_path):
    lines = [json.dumps({"text": f"record {i}", "note": "caf\u00e9"}, ensure_ascii=i % 2 == 0)
             + (" " * (i % 3)) for i in range(20)]
    src = write_lines(tmp_path / "all.jsonl", lines, final_newline=False)

    def run(seed: int, out: str) -> tuple[list[str], list[str]]:
        assert main(["data", "split", str(src), "--eval-fraction", "0.25", "--seed", str(seed), "--out",
                     str(tmp_path / out)]) == 0
        return tuple((tmp_path / out / f"{side}.jsonl").read_text(encoding="utf-8").splitlines()
                     for side in ("train", "eval"))

    train, held_out = run(0, "a")
    assert (train, held_out) == run(0, "b")
    assert len(held_out) == 5 and len(train) == 15
    assert sorted(train + held_out) == sorted(lines)  # the very lines, bytes and all, each on one side
    assert train == [line for line in lines if line in train]  # file order kept
    assert run(1, "c")[1] != held_out


@pytest.mark.parametrize("kind", ["json", "parquet", "dataset"])
def test_outputs_keep_the_input_format(tmp_path, kind):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ftcluster.data.formats import read_records

    records = [{"text": f"write to user{i}@example.com about item {i}", "n": i} for i in range(10)]
    records.append(dict(records[3]))
    src = tmp_path / {"json": "in.json", "parquet": "in.parquet", "dataset": "in"}[kind]
    if kind == "json":
        src.write_text(json.dumps(records))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), src)
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(src))
    scrubbed, deduped = (tmp_path / "out" / src.name.replace("in", name) for name in ("scrubbed", "deduped"))
    assert main(["data", "scrub", str(src), "--out", str(scrubbed)]) == 0
    assert main(["data", "dedup", str(scrubbed), "--out", str(deduped)]) == 0
    expected = [{"text": f"write to [EMAIL] about item {i}", "n": i} for i in range(10)]
    assert [r for _, r in read_records(str(deduped))] == expected
    assert main(["data", "split", str(src), "--eval-fraction", "0.2", "--out", str(tmp_path / "split")]) == 0
    sides = [[r for _, r in read_records(str(tmp_path / "split" / src.name.replace("in", side)))]
             for side in ("train", "eval")]
    assert [len(side) for side in sides] == [9, 2]
    assert sorted(map(json.dumps, sides[0] + sides[1])) == sorted(map(json.dumps, records))


def test_validate_lists_every_bad_line(tmp_path, capsys):
    good = json.dumps({"instruction": "Say hi.", "output": "hi"})
    src = write_lines(tmp_path / "mixed.jsonl", [
        good,
        '{"instruction": "cut short", "output": ',
        good,
        json.dumps({"instruction": "no answer"}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"instruction": "typed", "output": 42}),
        good,
    ])
    assert main(["data", "validate", str(src)]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"{src}:2: invalid JSON: Expecting value (column 40)",
        f"{src}:4: record has no 'output' field (format=alpaca expects instruction, input (optional), output, "
        f"system (optional))",
        f"{src}:5: a record must be a JSON object, got list",
        f"{src}:7: field 'output' must be a string, got int",
        f"{src}: 4 of 7 records are bad (format alpaca, guessed from the fields instruction, output)",
    ]
    assert main(["data", "validate", str(BUNDLED / "pairs_train.jsonl")]) == 0
    assert capsys.readouterr().out == (f"{BUNDLED / 'pairs_train.jsonl'}: all 200 records are valid (format "
                                       f"preference, guessed from the fields chosen, rejected)\n")


@pytest.mark.parametrize("job", [["validate"], ["dedup", "--out", "x.csv"], ["split", "--eval-fraction", "0.1",
                                                                            "--out", "split"]])
def test_unknown_file_format_names_the_supported_ones(tmp_path, capsys, job):
    table = tmp_path / "table.csv"
    table.write_text("instruction,output\nSay hi.,hi\n")
    command = ["data", job[0], str(table), *[str(tmp_path / a) if a in ("x.csv", "split") else a for a in job[1:]]]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ftcluster data: error: {table}: unknown file type '.csv'; supported: .jsonl (JSON Lines), .json "
                   f"(a list of objects), .parquet, compressed JSON Lines (.jsonl.gz, .jsonl.zst), or a folder written by "
                   f"datasets.Dataset.save_to_disk")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "split").exists()


def test_output_never_replaces_the_input(tmp_path, capsys):
    src = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "a b c"})])
    before = src.read_bytes()
    assert main(["data", "dedup", str(src), "--out", str(src)]) == 2
    assert main(["data", "split", str(src), "--eval-fraction", "0.5", "--out", str(tmp_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_summary_quantiles_are_observed_lengths():
    # Nearest rank: the median of 1..10 is the 5th value, p90 the 9th, p99 the 10th.
    assert summarize(list(range(1, 11)), limit=7) == {"examples": 10, "tokens": 55, "min": 1, "median": 5, "p90": 9,
                                                      "p99": 10, "max": 10, "over_limit": 3}


def test_stats_on_the_tiny_tokenizer_match_what_training_prepares(tmp_path, capsys):
    from helpers import TINY
    from ftcluster.config import compose
    from ftcluster.data.prepare import prepare
    from ftcluster.train.tokenizer import load_tokenizer

    train = write_lines(tmp_path / "train.jsonl", (BUNDLED / "train.jsonl").read_text().splitlines()[:40])
    evals = write_lines(tmp_path / "eval.jsonl", (BUNDLED / "eval.jsonl").read_text().splitlines()[:10])
    out = tmp_path / "stats"
    assert main(["data", "stats", str(train), "--eval", str(evals), "--model", "tiny", "--max-seq-len", "91",
                 "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train        40" in capsys.readouterr().out

    cfg = compose([*TINY, f"data.path={train}", f"data.eval_path={evals}", "trainer.max_seq_len=91",
                   "data.packing=false"])
    prepared = prepare(cfg, load_tokenizer(cfg.model.path), str(tmp_path / "prepared"))
    for split in ("train", "eval"):
        ours, theirs = stats["splits"][split], prepared[split]
        assert ours["examples"] == theirs["records"]
        assert 0 < ours["over_limit"] < ours["examples"]  # the limit falls inside the length range
        assert ours["over_limit"] == theirs["truncated"]
        assert ours["min"] <= 91 < ours["max"]
