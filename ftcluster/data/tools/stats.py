"""`ftcluster data stats`: token lengths per split as training will see them, and how many the max length cuts.

The lengths come from training's own path: the config is composed as `ftcluster train` composes it (the
same model files, conf/train.yaml's trainer.max_seq_len), records become examples through to_example and
tokens through data/template.py, data/pairs.py or data/prompts.py. So "37 examples longer than 256" here is
what `ftcluster train` will truncate, drop or refuse under data.truncation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ftcluster.config import compose, conf_dir
from ftcluster.data import pairs, prompts
from ftcluster.data.formats import read_records, to_example
from ftcluster.data.template import apply_template_override, encode_chat, encode_text
from ftcluster.data.tools.histogram import plot_lengths
from ftcluster.data.tools.validate import majority_format
from ftcluster.errors import DataError, UserError
from ftcluster.stages.registry import for_format
from ftcluster.train.bundled import resolve_model_path
from ftcluster.train.tokenizer import load_tokenizer
from ftcluster.util.atomic import replacing


def training_config(fmt: str, model: str | None, max_seq_len: int | None, chat_template: str | None) -> DictConfig:
    """conf/train.yaml composed as for `ftcluster train data=custom` on `fmt` data (with the stage that trains
    on it, whose settings may differ), with the model (a conf/model/ name or a folder), max length and template."""
    named = model is not None and (conf_dir() / "model" / f"{model}.yaml").is_file()
    cfg = compose(["data=custom", f"stage={for_format(fmt).name}"] + ([f"model={model}"] if named else []))
    if model is not None and not named:
        if not model.startswith("bundled:") and not Path(model, "config.json").is_file():
            known = ", ".join(sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml")))
            raise UserError(f"--model {model!r} is neither a model config in conf/model/ ({known}) nor a Hugging "
                            f"Face model folder (no config.json there)")
        cfg.model.path = model
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise UserError(f"--max-seq-len {max_seq_len}: it must be a positive number of tokens")
        cfg.trainer.max_seq_len = max_seq_len
    cfg.data.chat_template = chat_template
    return cfg


def length_stats(splits: dict[str, str], fmt: str | None = None, model: str | None = None,
                 max_seq_len: int | None = None, chat_template: str | None = None) -> dict:
    """Per split (name -> file): examples, token-length quantiles and the count over the length limit.
    The format is guessed from the training split's fields when not given; the rest defaults as in training."""
    records = {name: list(read_records(path)) for name, path in splits.items()}
    for name, path in splits.items():
        if not records[name]:
            raise DataError(path, None, "the file holds no records")
    if fmt is None:
        fmt = majority_format(splits["train"], records["train"])[0]
    cfg = training_config(fmt, model, max_seq_len, chat_template)
    # A token sequence, a pair (its longer side counts, as in training) or an RL prompt (which must leave room
    # for stage.rl.max_new_tokens), as the stage that trains on this format prepares it.
    kind = for_format(fmt).data_kind
    model_dir = resolve_model_path(cfg.model.path)
    if not any(Path(model_dir, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        # Some conf/model/ entries carry a model's shape only (for `ftcluster plan`), no tokenizer.
        raise UserError(f"{model_dir} holds no tokenizer (tokenizer.json or tokenizer_config.json); pass --model a "
                        f"model folder that has one")
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    if fmt != "text":
        apply_template_override(tokenizer, cfg.data.chat_template)
    limit = cfg.trainer.max_seq_len - (cfg.stage.rl.max_new_tokens if kind == "prompts" else 0)
    result = {"model": cfg.model.path, "format": fmt, "max_seq_len": cfg.trainer.max_seq_len, "limit": limit,
              "limit_means": _LIMIT_MEANS[kind], "splits": {}}
    for name, path in splits.items():
        lengths = [_length(path, line, to_example(record, fmt, path, line, cfg.data.system_prompt), kind, tokenizer)
                   for line, record in records[name]]
        result["splits"][name] = {"path": path, **summarize(lengths, limit), "lengths": lengths}
    return result


def summarize(lengths: list[int], limit: int) -> dict:
    """Count, total, min, nearest-rank median/p90/p99 (lengths that occur), max, and how many exceed `limit`."""
    a = np.asarray(lengths)

    def rank(q: float) -> int:
        return int(np.percentile(a, q, method="inverted_cdf"))

    return {"examples": len(lengths), "tokens": int(a.sum()), "min": int(a.min()), "median": rank(50),
            "p90": rank(90), "p99": rank(99), "max": int(a.max()), "over_limit": int((a > limit).sum())}


def write_report(result: dict, out: Path) -> tuple[Path, Path]:
    """out/stats.json (without the per-example lengths) and out/lengths.png."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {**result, "splits": {name: {k: v for k, v in split.items() if k != "lengths"}
                                    for name, split in result["splits"].items()}}
    stats_file, png = out / "stats.json", out / "lengths.png"
    with replacing(stats_file) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    plot_lengths({name: split["lengths"] for name, split in result["splits"].items()}, result["limit"],
                 f"{result['format']} data, {Path(result['model']).name} tokenizer", png)
    return stats_file, png


_LIMIT_MEANS = {
    "sequences": "trainer.max_seq_len: longer examples are cut, dropped or refused (data.truncation)",
    "pairs": "trainer.max_seq_len, on a pair's longer side: longer pairs are cut, dropped or refused "
             "(data.truncation)",
    "prompts": "trainer.max_seq_len - stage.rl.max_new_tokens: longer prompts are dropped or refused "
               "(data.truncation)",
}


def _length(path: str, line: int, example: dict, kind: str, tokenizer) -> int:
    try:
        if kind == "pairs":
            return pairs.pair_length(pairs.encode_pair(example, tokenizer))
        if kind == "prompts":
            return len(prompts.encode_prompt_row(prompts.as_prompt(example), tokenizer)["prompt_ids"])
        if "text" in example:
            return len(encode_text(example["text"], tokenizer)[0])
        return len(encode_chat(example["messages"], tokenizer)[0])
    except UserError as exc:
        # A template that fails on one conversation is reported at that conversation, as training does.
        raise DataError(path, line, str(exc)) from None
