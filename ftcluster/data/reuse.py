"""A prepared set found by its fingerprint, without the libraries that build one.

The store (store.py) keys a set by a fingerprint of everything that shapes its rows; this module computes it
from the tokenizer's facts (ftcluster.train.model_facts: cached per model folder) and looks the set up. A driver
whose set is there links it and goes on without importing datasets, transformers or torch (seconds of a small
machine's CPU before the first step); prepare.py builds a set that is not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ftcluster.data import store
from ftcluster.data.rows import require_rows
from ftcluster.data.sources import split_sources
from ftcluster.data.template import template_text
from ftcluster.stages.registry import STAGES

# Bump when the encoding or the layout on disk changes, so older prepared sets are not reused.
LAYOUT_VERSION = 5  # 5: the tokenizer enters the fingerprint as its facts' identity digest


@dataclass(frozen=True)
class TokenizerFacts:
    identity: str  # sha256 of the fast tokenizer's definition, less its padding and truncation state
    chat_template: str | None
    eos_token_id: int | None
    size: int  # len(tokenizer): the vocabulary with the added tokens


def tokenizer_facts(tokenizer) -> TokenizerFacts:
    return TokenizerFacts(hashlib.sha256(_tokenizer_identity(tokenizer).encode()).hexdigest(), tokenizer.chat_template,
                          tokenizer.eos_token_id, len(tokenizer))


def reuse_prepared(cfg, tokenizer: TokenizerFacts, out_dir: str | None, log=print) -> dict | None:
    """What prepare.prepare(cfg, <that tokenizer>, out_dir) returns when the store holds the set, found from the
    tokenizer's facts (data.chat_template applied here) without the tokenizer; None when it must be prepared."""
    if uses_template(cfg) and cfg.data.chat_template is not None:
        tokenizer = dataclasses.replace(tokenizer, chat_template=template_text(cfg.data.chat_template))
    key = fingerprint(cfg, tokenizer)
    folder = store.entry(cfg.data.get("prepared_dir"), key)
    stats = store.complete(folder, key)
    if stats is None:
        return None
    log(f"[ftcluster] data: reusing the prepared set {folder} (fingerprint {key[:12]}); no tokenization")
    return use(cfg, folder, stats, out_dir, reused=True)


def use(cfg, folder: Path, stats: dict, out_dir: str | None, reused: bool) -> dict:
    """The set in `folder` as cfg's: checked for enough rows, linked from `out_dir`; its stats (with out_dir None,
    also where it is, as "dir", and whether it was `reused`)."""
    # Checked on a reused set too: it may have been prepared for a smaller trainer.global_batch.
    require_rows(stats["train"]["rows"], rows_per_step(cfg), str(folder / "train"))
    if out_dir is not None:
        store.link(Path(out_dir), folder)
    return {**stats, "dir": str(folder), "reused": reused} if out_dir is None else stats


def uses_template(cfg) -> bool:
    formats = {cfg.data.format} | {s.get("format") or cfg.data.format for s in (cfg.data.get("sources") or [])}
    return formats != {"text"}


def rows_per_step(cfg) -> int:
    return cfg.stage.rl.prompts_per_step if STAGES[cfg.stage.name].data_kind == "prompts" else cfg.trainer.global_batch


def fingerprint(cfg, tokenizer: TokenizerFacts) -> str:
    """The store's key for cfg's prepared set: the data files' bytes, the tokenizer, and every setting that
    shapes the rows. Settings that do not (learning rate, steps, the launcher) leave it unchanged, so sweep
    trials over them share one set."""
    data = cfg.data
    h = hashlib.sha256()
    for split in ("train", "eval"):
        h.update(split.encode())
        for source in split_sources(data, split) or []:
            h.update(json.dumps([source.format, source.weight]).encode())
            for file in source.files:
                _hash_file(h, Path(file))
    h.update(tokenizer.identity.encode())
    kind = STAGES[cfg.stage.name].data_kind
    settings = {
        "layout": LAYOUT_VERSION,
        "kind": kind,
        "room_for_generation": cfg.stage.rl.max_new_tokens if kind == "prompts" else None,
        "chat_template": tokenizer.chat_template if uses_template(cfg) else None,
        "eos": tokenizer.eos_token_id,
        "format": data.format,
        "system_prompt": data.system_prompt,
        "train_on": data.train_on,
        "packing": data.packing,
        "truncation": data.truncation,
        "max_seq_len": cfg.trainer.max_seq_len,
        # The seed and fraction only shape the data when eval is held out of data.path; the seed also
        # samples a mixture's weighted sources.
        "hold_out": None if data.eval_path or not data.eval_fraction else [data.eval_fraction, cfg.seed],
        "mixture_seed": cfg.seed if data.get("sources") else None,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    h.update(path.name.encode() if path.is_dir() else b"file")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        stat = file.stat()
        h.update(_file_digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino))


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> bytes:
    """A data file's sha256, read once per process while the file is unchanged: a sweep fingerprints every
    trial's config, and a multi-GB data set would otherwise be read again for each."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def _tokenizer_identity(tokenizer) -> str:
    """What makes the tokenizer's tokens: the fast tokenizer's whole definition, less its padding and truncation
    state, which the encoder never uses (it tokenizes unpadded, untruncated) and which a saved tokenizer carries
    from how it was last called (a run's final/ tokenizer pads left for generation), so that eval and a run
    share a set."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(sorted(tokenizer.get_vocab().items()))
    definition = json.loads(backend.to_str())
    definition.pop("padding", None)
    definition.pop("truncation", None)
    return json.dumps(definition, sort_keys=True)
