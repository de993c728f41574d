"""What a launching process needs to know of a model folder, without loading it: its tokenizer's identity, chat
template, end-of-sequence id and size (the prepared data's fingerprint; the model checks), its vocabulary and
positions (the model checks).

Loading a tokenizer imports transformers, and torch under it: 3-4 s of CPU in a driver whose data is already
prepared, on the path to the first step (and beside the ranks, which import them meanwhile). So the facts are
read once with the libraries and kept in the cache, keyed by the folder's files other than its weights, by
trust_remote_code and by the transformers and tokenizers versions; a later run reads a small JSON file.

The facts also name the tokenizer class AutoTokenizer chose for the folder, where loading that class directly
gives the same tokenizer (checked here, once): ftcluster.train.tokenizer then loads it without AutoTokenizer,
whose model-config lookup imports torch (0.8 s instead of 3 s for SmolLM2's, on a driver that has data to
prepare and nothing else that needs torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ftcluster.data.reuse import TokenizerFacts, tokenizer_facts
from ftcluster.util.cache import cache_root, content_key

# Files that hold weights, not the tokenizer or the config: left out of the key (they can be GBs).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
_MAX_KEYED_BYTES = 512 * 2**20  # a folder with more than this of other files is read each time, not kept
_FACTS_VERSION = 2  # in the key: entries of an older layout are read again (2: tokenizer_class)


@dataclass(frozen=True)
class FolderFacts:
    tokenizer: TokenizerFacts
    vocab_size: int | None  # of the (text) model's embedding
    max_position_embeddings: int | None
    # transformers' class that loads this folder's tokenizer as AutoTokenizer does; None: only AutoTokenizer
    tokenizer_class: str | None = None


def folder_facts(folder: str, trust_remote_code: bool) -> FolderFacts:
    """The facts of the model folder `folder` as ftcluster.train.tokenizer.load_tokenizer and AutoConfig read
    it; from the cache when the folder's files are unchanged."""
    entry = _cache_entry(Path(folder), trust_remote_code)
    facts = _saved(entry)
    if facts is not None:
        return facts
    facts = _read(folder, trust_remote_code)
    if entry is not None:  # written whole under a name of this thread's, then renamed: readers see all or nothing
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dataclasses.asdict(facts)))
            os.replace(tmp, entry)
        except OSError:  # a cache that cannot be written (read-only, full): the facts are read again next time
            with contextlib.suppress(OSError):
                tmp.unlink()
    return facts


def cached_facts(folder: str, trust_remote_code: bool) -> FolderFacts | None:
    """The facts folder_facts would give, when the cache has them (nothing is read with the libraries)."""
    return _saved(_cache_entry(Path(folder), trust_remote_code))


def _saved(entry: Path | None) -> FolderFacts | None:
    if entry is None or not entry.is_file():
        return None
    try:
        saved = json.loads(entry.read_text())
        return FolderFacts(TokenizerFacts(**saved.pop("tokenizer")), **saved)
    except (OSError, ValueError, TypeError):  # unreadable or torn by hand: read again with the libraries
        return None


def _read(folder: str, trust_remote_code: bool) -> FolderFacts:
    from transformers import AutoConfig, AutoTokenizer

    text = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).get_text_config()
    # As ftcluster.train.tokenizer loads it, less the pad token it may set (eos: no token added, nothing the facts
    # hold changes).
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return FolderFacts(tokenizer_facts(tokenizer), getattr(text, "vocab_size", None),
                       getattr(text, "max_position_embeddings", None), _direct_class_name(folder, tokenizer))


def _direct_class_name(folder: str, tokenizer) -> str | None:
    """The name of the tokenizer's class when transformers exports it and its from_pretrained alone makes the same
    tokenizer (compared whole, pickled: vocabulary, special tokens, template, settings); else None."""
    import pickle

    import transformers

    name = type(tokenizer).__name__
    if getattr(transformers, name, None) is not type(tokenizer):  # a folder's own code (auto_map), or not exported
        return None
    try:
        direct = type(tokenizer).from_pretrained(folder)
        return name if pickle.dumps(direct) == pickle.dumps(tokenizer) else None
    except Exception:  # whatever fails this way is left to AutoTokenizer, as before
        return None


def _cache_entry(folder: Path, trust_remote_code: bool) -> Path | None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)
                   and "__pycache__" not in p.parts)
    if not files or sum(p.stat().st_size for p in files) > _MAX_KEYED_BYTES:
        return None
    key = content_key(folder, files, (trust_remote_code, _FACTS_VERSION), ("transformers", "tokenizers"))
    return cache_root() / "model_facts" / f"{key}.json"
