"""`ftcluster bench`: a two-cell suite on this CPU end to end (through the CLI's main() in this process, on
the session's Ray cluster), resume, compare, and the suite errors that must come before any cell runs."""

import csv
import json
import time
from pathlib import Path

import pytest

from ftcluster.cli import main
from ftcluster.observe.track import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def bench(capsys, *args):
    code = main(["bench", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def smoke_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    code = main(["bench", "suite=cpu_smoke", "--results", str(root / "results"), "--work", str(root / "work")])
    assert code == 0
    return root


@pytest.mark.slow
def test_two_cell_cpu_suite_writes_consistent_figures(smoke_suite):
    stem = f"cpu_smoke_cpu_{time.strftime('%Y-%m-%d')}"
    results, work = smoke_suite / "results", smoke_suite / "work"
    records = [json.loads(line) for line in (results / f"{stem}.jsonl").read_text().splitlines()]
    assert [r["axes"] for r in records] == [{"strategy": "zero0"}, {"strategy": "zero3"}]
    for r in records:
        assert r["status"] == "ok", r
        assert r["world_size"] == 2 and r["steps_measured"] == 3
        # The figures are the cell's own metrics.jsonl over the steps after the warm-up, summed, not averaged.
        rows = [m for m in read_metrics(work / "cells" / r["folder"]) if "step_time_s" in m and m["step"] > 1]
        elapsed = sum(m["step_time_s"] for m in rows)
        assert r["tokens_per_s"] == pytest.approx(sum(m["tokens_per_s"] * m["step_time_s"] for m in rows) / elapsed)
        assert r["samples_per_s"] == pytest.approx(sum(m["samples_per_s"] * m["step_time_s"] for m in rows) / elapsed)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
        assert 0 < r["step_time_median_s"] <= r["step_time_p90_s"] <= max(m["step_time_s"] for m in rows)
        assert 0 < r["comm_share"] < 1
        # Model FLOPs: the tiny model's per-token FLOPs at the measured rate, over the measured CPU peak.
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / r["peak_flops_per_device"])
        assert 0 < r["mfu"] < 1
        # Each rank's resident-set high-water mark: torch and its friends alone hold a few hundred MiB.
        assert len(r["peak_memory_bytes_per_rank"]) == 2 and r["peak_memory_bytes"] == max(r["peak_memory_bytes_per_rank"])
        assert r["peak_memory_bytes"] > 200 * 2**20
        predicted = r["predicted"]
        assert predicted["peak_memory_bytes"] > 0 and predicted["tokens_per_s"] > 0
        # Throughput predicted for the tokens the measured steps held (the planner's own figure assumes full rows).
        assert r["tokens_per_step"] == pytest.approx(sum(m["tokens_per_s"] * m["step_time_s"] for m in rows) / 3)
        assert predicted["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / predicted["step_time_s"])
        assert predicted["tokens_per_s_full_rows"] >= predicted["tokens_per_s"]
        # On a CPU the prediction is the planner's tensors plus what each rank held that is not its engine's.
        assert 200 * 2**20 < r["baseline_bytes"] < r["peak_memory_bytes"]
        assert predicted["peak_memory_bytes"] == predicted["tensor_bytes"] + r["baseline_bytes"]
        assert r["errors"]["peak_memory_bytes"] == pytest.approx(
            (predicted["peak_memory_bytes"] - r["peak_memory_bytes"]) / r["peak_memory_bytes"])
        assert not (work / "cells" / r["folder"] / "checkpoints").exists()  # weights dropped once measured
    table = list(csv.DictReader((results / f"{stem}.csv").open()))
    assert [row["strategy"] for row in table] == ["zero0", "zero3"]
    assert float(table[1]["tokens_per_s"]) == pytest.approx(records[1]["tokens_per_s"])
    for plot in ("throughput", "memory"):
        assert (results / f"{stem}_{plot}.png").read_bytes()[:8] == PNG
    report = (results / f"{stem}.md").read_text()
    for section in ("## Machine", "## Results", "## Plots", "## Suite", "## Full config of the first measured cell",
                    "predicted mem (GiB)", "mem error", f"]({stem}_throughput.png)", "torch 2."):
        assert section in report, section


@pytest.mark.slow
def test_a_suite_run_again_skips_its_finished_cells_and_compares_to_itself(smoke_suite, capsys):
    work = smoke_suite / "work"
    metrics = work / "cells" / "strategy_zero0" / "metrics.jsonl"
    before = (work / "cells.jsonl").read_text(), metrics.stat().st_mtime_ns
    code, out, _ = bench(capsys, "suite=cpu_smoke", "--results", str(smoke_suite / "again"), "--work", str(work))
    assert code == 0 and "2 of 2 cells measured" in out
    assert ((work / "cells.jsonl").read_text(), metrics.stat().st_mtime_ns) == before
    stem = f"cpu_smoke_cpu_{time.strftime('%Y-%m-%d')}"
    code, out, _ = bench(capsys, "compare", str(smoke_suite / "results" / f"{stem}.md"),
                         str(smoke_suite / "again" / f"{stem}.jsonl"))
    assert code == 0
    assert "| strategy=zero3 |" in out and "tokens/s B/A, geometric mean over 2 cells: 1.000" in out


def test_one_cell_in_this_process_is_measured_reported_and_compared(capsys, tmp_path):
    """The fast tier's suite: one cell on launcher=inline (no Ray), its figures from its own metrics.jsonl,
    the report, and `bench compare` of the result with itself."""
    text = ("base: [model=tiny, data=json_extract, peft=none, tracking=none, launcher=inline, launcher.workers=1,"
            " trainer.max_seq_len=256, trainer.micro_batch_per_device=2, trainer.global_batch=8]\n"
            "warmup_steps: 1\nmeasure_steps: 2\nmatrix: {strategy: [zero0]}\n")
    results, work = tmp_path / "results", tmp_path / "work"
    code, out, err = bench(capsys, f"suite={suite_file(tmp_path, text)}", "--work", str(work), "--results", str(results))
    assert code == 0, err
    (jsonl,) = results.glob("mine_*.jsonl")
    (r,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert r["status"] == "ok" and r["world_size"] == 1 and r["steps_measured"] == 2, r
    rows = [m for m in read_metrics(work / "cells" / r["folder"]) if "step_time_s" in m and m["step"] > 1]
    elapsed = sum(m["step_time_s"] for m in rows)
    assert r["tokens_per_s"] == pytest.approx(sum(m["tokens_per_s"] * m["step_time_s"] for m in rows) / elapsed)
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"])
    assert "## Results" in jsonl.with_suffix(".md").read_text()
    code, out, _ = bench(capsys, "compare", str(jsonl.with_suffix(".md")), str(jsonl))
    assert code == 0 and "| strategy=zero0 |" in out and "tokens/s B/A, geometric mean over 1 cells: 1.000" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"cell": "strategy=zero0"}\n')
    code, _, err = bench(capsys, "compare", str(jsonl), str(bad))
    assert code == 2 and f"{bad}:1: not a bench cell record" in err, err


def suite_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, says", [
    ("matrix: {}\n", "the matrix has no cells"),
    ("matrix: {strategy: []}\n", "needs a non-empty list of values"),
    ("matrix: {trainer.no_such_key: [1, 2]}\n", "matrix axis 'trainer.no_such_key' is neither a config group"),
    ("matrix: {strategy: [zero9]}\n", "config group 'strategy' has no option 'zero9'"),
])
def test_a_bad_suite_is_refused_before_any_cell_runs(capsys, tmp_path, text, says):
    code, _, err = bench(capsys, f"suite={suite_file(tmp_path, text)}", "--work", str(tmp_path / "work"),
                         "--results", str(tmp_path / "results"))
    assert code == 2 and says in err, err
    assert not (tmp_path / "work" / "cells").exists()


def test_unknown_suite_and_profile_list_the_known_ones(capsys, tmp_path):
    code, _, err = bench(capsys, "suite=nope")
    assert code == 2 and "known: cpu_smoke" in err
    code, _, err = bench(capsys, "suite=cpu_smoke", "--cluster", "tpu_v9", "--work", str(tmp_path))
    assert code == 2 and "tpu_v9" in err and "h100_sxm" in err


def test_cells_this_machine_cannot_run_are_skipped_with_the_reason(capsys, tmp_path):
    text = "base: [model=tiny, data=json_extract, peft=none, strategy.precision=bf16]\nmatrix: {model.attn_implementation: [flash_attention_2]}\n"
    code, _, err = bench(capsys, f"suite={suite_file(tmp_path, text)}", "--work", str(tmp_path / "work"),
                         "--results", str(tmp_path / "results"))
    assert code == 2 and "no cell of suite mine could be measured" in err and "flash-attn" in err
    report = next((tmp_path / "results").glob("mine_*.md")).read_text()
    assert "**skipped**" in report and "flash-attn" in report
