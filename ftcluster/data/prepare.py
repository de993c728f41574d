"""Turn the configured data into encoded, packed, memory-mappable splits, once, before any worker.

Every data problem a user can have (a bad record, an over-long example under truncation=error, a split
that filtering empties) is raised here, in the launching process, as one DataError naming file and line
(with several bad records, the first ones in file order). Workers only memory-map the result.

The set is keyed by a fingerprint of everything that shapes it and kept in the store (store.py), so an
unchanged relaunch, a resume, `ftcluster eval`, a sweep trial or `ftcluster data prepare` beforehand all
reuse one preparation. Sequence sets (SFT) stream: records are read and encoded unit by unit, in this
process or in parallel on Ray (data.prepare_workers), each unit into a shard; packing then works from
token lengths on the driver, and the rows are assembled from the shards a chunk at a time (on Ray too, when
the encoders ran there). The rows are byte-identical for any number of workers: nothing depends on which
worker encoded or wrote what.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import datasets

from ftcluster.data import store
from ftcluster.data.assemble import generate_lines, rows_digest, write_rows
from ftcluster.data.encode import Settings
from ftcluster.data.in_memory import hold_out, read_splits, small_rows  # noqa: F401  (hold_out: tools/split.py)
from ftcluster.data.reuse import fingerprint, rows_per_step, tokenizer_facts, use, uses_template
from ftcluster.data.rows import require_rows
from ftcluster.data.packing import token_efficiency
from ftcluster.data.parallel import encode_units, on_cluster, pool_size, worker_count
from ftcluster.data.sources import split_sources, units
from ftcluster.data import splits as splitting
from ftcluster.data.template import apply_template_override, prompt_and_reference
from ftcluster.errors import ConfigError
from ftcluster.stages.registry import STAGES

FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "example_lengths": datasets.List(datasets.Value("int32")),
    "num_examples": datasets.Value("int32"),
})
PAIR_FEATURES = datasets.Features({  # pairs.py's rows
    "chosen_input_ids": datasets.List(datasets.Value("int32")),
    "chosen_labels": datasets.List(datasets.Value("int32")),
    "rejected_input_ids": datasets.List(datasets.Value("int32")),
    "rejected_labels": datasets.List(datasets.Value("int32")),
    "margin": datasets.Value("float32"),
})
PROMPT_FEATURES = datasets.Features({  # prompts.py's rows
    "prompt_ids": datasets.List(datasets.Value("int32")),
    "prompt_json": datasets.Value("string"),
    "extra_json": datasets.Value("string"),
})
_FEATURES = {"sequences": FEATURES, "pairs": PAIR_FEATURES, "prompts": PROMPT_FEATURES}


def prepare(cfg, tokenizer, out_dir: str | None, connect: Callable[[], None] | None = None, log=print) -> dict:
    """Make `out_dir` (None: no link; the stats then say where the set is, as "dir") the prepared set for `cfg` ({train,eval,eval_generate.jsonl,stats.json}; eval: with eval
    data only), preparing it in the store unless a matching set is there; return its stats.

    `connect` joins or starts the Ray cluster that data.prepare_workers other than 1 run on (the driver's
    launcher); without it, a Ray already connected in this process is used, else one worker."""
    key = prepared_key(cfg, tokenizer)
    folder = store.entry(cfg.data.get("prepared_dir"), key)
    stats = store.complete(folder, key)
    reused = stats is not None
    if stats is None:
        with store.locked(folder, on_wait=lambda: log(f"[ftcluster] data: another process is preparing the same set "
                                                      f"in {folder}; waiting to reuse it")):
            stats = store.complete(folder, key)  # another process may have prepared it while we waited
            if stats is None:
                with store.building(folder) as tmp:
                    stats = _build(cfg, tokenizer, tmp, key, connect)
                    # Last, whole: a set with a stats.json is complete (the folder is renamed into place after).
                    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            else:
                log(f"[ftcluster] data: reusing the prepared set {folder} (prepared by another process meanwhile)")
    else:
        log(f"[ftcluster] data: reusing the prepared set {folder} (fingerprint {key[:12]}); no tokenization")
    return use(cfg, folder, stats, out_dir, reused)


def _build(cfg, tokenizer, out: Path, key: str, connect) -> dict:
    kind = STAGES[cfg.stage.name].data_kind
    started = time.monotonic()
    stats = {"fingerprint": key, "format": cfg.data.format, "kind": kind,
             "packed": kind == "sequences" and bool(cfg.data.packing), "max_seq_len": cfg.trainer.max_seq_len,
             "pad_id": _pad_id(tokenizer), "eval_generate": 0}
    if kind == "sequences":
        workers = _build_sequences(cfg, tokenizer, out, stats, connect)
    else:
        if cfg.data.get("sources"):
            raise ConfigError("data.sources", f"mixtures are for sequence stages (sft); stage={cfg.stage.name} "
                                              f"reads data.path")
        workers = _build_small(cfg, tokenizer, out, stats, kind)
    seconds = time.monotonic() - started
    tokens = sum(stats[s]["tokens"] for s in ("train", "eval") if s in stats)
    stats["rows_digest"] = stats["train"]["rows_digest"]
    stats["prepare"] = {"workers": workers, "seconds": round(seconds, 2),
                        "tokens_per_s": round(tokens / seconds) if seconds else 0, **stats.get("prepare", {})}
    return stats


def _build_sequences(cfg, tokenizer, out: Path, stats: dict, connect) -> int:
    data = cfg.data
    train_sources, eval_sources = split_sources(data, "train"), split_sources(data, "eval")
    held_out = eval_sources is None and data.eval_fraction > 0
    work = units("train", train_sources, 0, keep_generate=held_out)
    if eval_sources:
        work += units("eval", eval_sources, len(work), keep_generate=True)
    settings = Settings(data.train_on, data.system_prompt, cfg.trainer.max_seq_len, data.truncation)
    started = time.monotonic()
    workers = worker_count(data.get("prepare_workers", 1), connect, len(work)) if len(work) > 1 else 1
    shards = out / "shards"
    shards.mkdir()
    summaries = {}
    with _progress(len(work), workers) as bar:
        for summary in encode_units(work, settings, tokenizer, shards, workers, connect):
            summaries[summary.unit] = summary
            bar.update(1)
            bar.set_postfix(records=sum(s.records for s in summaries.values()), refresh=False)
    workers = pool_size(workers)
    splitting.raise_errors(summaries)
    encoded = time.monotonic()

    train = splitting.gather("train", work, train_sources, summaries)
    evals = splitting.gather("eval", work, eval_sources, summaries) if eval_sources else None
    if held_out:
        train, evals = splitting.hold_out(train, data.eval_fraction, cfg.seed, str(data.path))
    train = splitting.weigh(train, train_sources, cfg.seed)
    for name, split in (("train", train), ("eval", evals)):
        if split is None:
            continue
        splitting.require_some(name, split, cfg.trainer.max_seq_len)
        counts = splitting.counts(split)
        rows, tokens, digest = write_rows(split.examples, shards, out / name, FEATURES, cfg.trainer.max_seq_len,
                                          bool(data.packing), parallel=on_cluster(workers))
        if name == "train":
            require_rows(rows, rows_per_step(cfg), split.first_path)  # before any worker starts
            if data.get("sources"):
                counts["sources"] = splitting.proportions(split, train_sources)
        counts.update(rows=rows, packing_efficiency=round(token_efficiency(tokens, rows, cfg.trainer.max_seq_len), 4),
                      rows_digest=digest)
        stats[name] = counts
        if name == "eval":
            stats["eval_generate"] = _write_lines(generate_lines(split.examples, shards), out / "eval_generate.jsonl")
    _remove_tree(shards)  # the rows hold every token now
    # Where the time went: reading and encoding (starting Ray and the encoders included, this process encoding
    # meanwhile), then packing (in this process) and writing the rows (in parallel on Ray with the encoders).
    stats["prepare"] = {"encode_s": round(encoded - started, 2), "assemble_s": round(time.monotonic() - encoded, 2)}
    return workers


def _build_small(cfg, tokenizer, out: Path, stats: dict, kind: str) -> int:
    train_items, eval_items = read_splits(cfg)
    for name, items in (("train", train_items), ("eval", eval_items)):
        if items is None:
            continue
        rows, counts, kept = small_rows(kind, name, items, cfg, tokenizer)
        if name == "train":
            require_rows(len(rows), rows_per_step(cfg), cfg.data.path)
        _save_rows(rows, out / name, _FEATURES[kind])
        stats[name] = {**counts, "rows_digest": rows_digest(rows)}
        if kept:
            stats["eval_generate"] = _write_lines(
                (json.dumps(dict(zip(("prompt", "reference"), prompt_and_reference(e))), ensure_ascii=False)
                 for e in kept if "messages" in e), out / "eval_generate.jsonl")
    return 1


@contextmanager
def _progress(total: int, workers: int):
    from tqdm import tqdm

    # On a terminal only: in a log file (a SLURM job's, a Ray job's) a bar is only noise.
    shown = f"{workers} worker{'s' * (workers > 1)}" if workers else "every core of the cluster"
    with tqdm(total=total, unit="unit", desc=f"[ftcluster] preparing data ({shown})",
              disable=not sys.stderr.isatty(), leave=False) as bar:
        yield bar


def _write_lines(lines, path: Path) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            count += 1
    return count


def _pad_id(tokenizer) -> int:
    # Padding is never attended to nor trained on, so any id in the vocabulary serves.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@contextmanager
def quiet_datasets():
    # Saving a split is quick; its progress bars would only bury the launch log.
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _save_rows(rows: list[dict], where: Path, features: datasets.Features) -> None:
    columns = {key: [row[key] for row in rows] for key in features}
    with quiet_datasets():
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(where))


def prepared_key(cfg, tokenizer) -> str:
    """The fingerprint prepare() keys cfg's set by: data.chat_template is applied to the tokenizer first (and
    stays applied), as prepare() applies it before encoding."""
    if uses_template(cfg):
        apply_template_override(tokenizer, cfg.data.chat_template)
    return fingerprint(cfg, tokenizer_facts(tokenizer))
