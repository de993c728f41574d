"""`ftcluster eval [overrides]` in the launching process: check, prepare, launch the workers, score, report.

Every check that can fail on user input runs before any model is loaded: what eval.model and
eval.baseline name (files only), the metrics against the data (a text set has no references; JSON field
accuracy needs JSON-object references), the eval split and the general set (read, every record checked).
Then each model's folder is made ready (a checkpoint exported, a bundled model converted), the data is
encoded with that model's tokenizer exactly as training encodes it (ftcluster.data.prepare), and the
workers score every model; the metrics are computed here from the answers they wrote.

With launcher.workers=1 the worker runs in this process (no Ray, no process group); with more, on the
configured launcher, each rank taking its share of the batches and prompts.

When eval.model belongs to a run and the command line sets no data key, the run's data section (and its
trainer.max_seq_len and seed) are used: the model is scored on what that run held out, encoded as it was.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import datasets
from omegaconf import DictConfig, OmegaConf

from ftcluster.config import compose, to_yaml, validate
from ftcluster.data import store
from ftcluster.data.formats import read_records, to_example
from ftcluster.data.packing import pack, unpacked
from ftcluster.data.prepare import FEATURES, prepare, quiet_datasets, read_splits
from ftcluster.data.template import IGNORE, encode_text, prompt_and_reference
from ftcluster.errors import ConfigError, DataError
from ftcluster.eval import report
from ftcluster.eval.scorer import eval_tokenizer, eval_worker
from ftcluster.eval.scores import check_names, check_references, compute
from ftcluster.eval.targets import Target, default_baseline, from_model_section, materialize, resolve, run_config
from ftcluster.launch import launcher_for, submitter_for
from ftcluster.util.atomic import write_text
from ftcluster.util.outputs import claim_folder, mark_folder

ROLES = ("tuned", "base")  # eval.model, eval.baseline
_FORMATS = ("alpaca", "chat", "text")
COMMAND = "ftcluster eval"
# Everything eval writes in its output_dir; a folder holding anything else is not eval's to write into.
OUTPUT_NAMES = ("config.yaml", "eval.json", "outputs.jsonl", "eval.md", "data", "models", "work")


def eval_command(overrides: list[str]) -> Path:
    """Returns the path of eval.md."""
    cfg = compose(overrides)
    targets = plan(cfg, overrides)
    out = Path(cfg.output_dir)
    mark_folder(out, COMMAND, OUTPUT_NAMES)  # first: an eval cut short is still recognised as eval's own
    print("[ftcluster] eval: " + "; ".join(f"{role} = {t.spec} ({t.kind})" for role, t in targets.items())
          + f"; data {cfg.data.eval_path or cfg.data.path}; general text {cfg.eval.general}; output {out}")
    payload = {"config": OmegaConf.to_container(cfg, resolve=True), "output_dir": str(out),
               "models": [prepare_model(cfg, role, target, out) for role, target in targets.items()]}
    (out / "config.yaml").write_text(to_yaml(cfg))
    started = time.time()
    launch(payload, cfg)
    results = collect(payload, out)
    print(f"[ftcluster] eval took {time.time() - started:.0f} s")
    return write_outputs(cfg, targets, payload, results, out)


def plan(cfg: DictConfig, overrides: list[str]) -> dict[str, Target]:
    """Every check that needs no model; settles the config (data, output_dir) and returns what to score."""
    e = cfg.eval
    for key, low in (("max_new_tokens", 1), ("batch_size", 1), ("report_examples", 0)):
        if e[key] < low:
            raise ConfigError(f"eval.{key}", f"got {e[key]}; it must be {low} or more")
    check_names(e.metrics, "eval.metrics")
    tuned = (resolve(e.model, "eval.model") if e.model is not None
             else from_model_section(cfg.model.path, cfg.model.init, cfg.model.name, "eval.model"))
    run_cfg = run_config(tuned)
    if run_cfg is not None:
        adopt_run_settings(cfg, run_cfg, overrides)
    targets = {"tuned": tuned}
    if e.baseline == "auto":
        found = default_baseline(tuned)
        if found is None:
            print(f"[ftcluster] eval: no base model known for {tuned.spec}; set eval.baseline= to compare with one")
        else:
            targets["base"] = resolve(found, "eval.baseline")
    elif e.baseline is not None:
        targets["base"] = resolve(e.baseline, "eval.baseline")
    check_data(cfg)
    _check_placement(cfg)
    cfg.stage.name, cfg.peft.method = "sft", "none"  # scored as a plain causal LM; adapters come from targets
    validate(cfg, check_paths=False)
    default = (Path(tuned.run_dir, "eval") if tuned.run_dir
               else Path("runs", "eval-" + re.sub(r"[^\w.-]+", "-", Path(tuned.spec).name)))
    out = Path(e.output_dir or default).resolve()
    if (out / "manifest.json").is_file():
        raise ConfigError("eval.output_dir", f"{out} holds a training run, whose config.yaml eval would overwrite; "
                                             f"use a folder of its own such as {out / 'eval'}")
    # An earlier eval's output there is replaced, as it always was (no flag); anything else is refused.
    claim_folder(out, COMMAND, option="eval.output_dir", overwrite=True,
                 inputs=[t.path for t in targets.values() if Path(t.path).exists()])
    cfg.output_dir = str(out)
    return targets


def _check_placement(cfg: DictConfig) -> None:
    if cfg.launcher.workers > 1 and submitter_for(cfg) is not None:
        raise ConfigError("launcher.name", f"with launcher={cfg.launcher.name} and this address, train would submit a "
                                           f"job; eval places its workers from this process only: run it inside the "
                                           f"allocation or on the cluster (launcher=local, or launcher=ray "
                                           f"launcher.address=HOST:6379), or with launcher.workers=1")


def adopt_run_settings(cfg: DictConfig, run_cfg: DictConfig, overrides: list[str]) -> None:
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if not any(key == "data" or key.startswith("data.") for key in named):
        cfg.data = run_cfg.data
    for key in ("trainer.max_seq_len", "seed"):
        if key not in named:
            OmegaConf.update(cfg, key, OmegaConf.select(run_cfg, key))


def check_data(cfg: DictConfig) -> None:
    data, e = cfg.data, cfg.eval
    if data.format not in _FORMATS:
        raise ConfigError("data.format", f"eval scores answers to prompts and the perplexity of text: it needs "
                                         f"alpaca, chat or text data, not {data.format!r} (for a preference run, "
                                         f"evaluate on its SFT data, e.g. data=json_extract)")
    for key in ("data.path", "data.eval_path"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(key, f"{value} does not exist")
    if not data.eval_path and not (data.path and data.eval_fraction > 0):
        raise ConfigError("data.eval_path", "eval scores held-out data: set data.eval_path=FILE, or "
                                            "data.eval_fraction to hold some of data.path out as training does")
    where = data.eval_path or f"{data.path} (data.eval_fraction={data.eval_fraction})"
    if e.metrics and data.format == "text":
        raise ConfigError("eval.metrics", f"{list(e.metrics)} score generated answers against references, but the "
                                          f"eval data {where} is data.format=text, which has none (references are "
                                          f"the last assistant turn of alpaca or chat records). Set eval.metrics=[] "
                                          f"for perplexity alone, or use alpaca or chat eval data")
    _, items = read_splits(_preparation_config(cfg))
    check_references(e.metrics, [prompt_and_reference(ex)[1] for _, _, ex in items if "messages" in ex],
                     "eval.metrics", f"the eval data {where}")
    if e.general is not None:
        if not Path(e.general).is_file():
            raise ConfigError("eval.general", f"{e.general} does not exist; give a text file (JSONL, JSON or Parquet "
                                              f"records with a `text` field), or eval.general=null to skip it")
        general_documents(e.general)


def _preparation_config(cfg: DictConfig) -> DictConfig:
    """The config data.prepare sees: the eval split is what matters, so any train split size will do, and
    eval data alone (data.path unset) stands in for it."""
    prep = cfg.copy()
    prep.trainer.global_batch = 1
    prep.data.path = cfg.data.path or cfg.data.eval_path
    prep.stage.name = "sft"
    return prep


def general_documents(path: str) -> list[str]:
    documents = [to_example(record, "text", path, line)["text"] for line, record in read_records(path)]
    if not documents:
        raise DataError(path, None, "the general text set holds no records")
    return documents


def prepare_model(cfg: DictConfig, role: str, target: Target, out: Path) -> dict:
    """The model made loadable and the data encoded with its tokenizer: <out>/data/<role> links to the prepared
    set in the store (the very set the run trained and evaluated on, reused, when eval.model is a run's and its
    tokenizer and data settings are unchanged); the general text's rows go beside it, in <out>/data/<role>-general,
    never into the store's set, which other runs and evals share."""
    model_dir, adapter_dir = materialize(target, role, out, cfg.seed, cfg.model.trust_remote_code)
    tokenizer = eval_tokenizer(cfg, model_dir, adapter_dir)
    data_dir, general_dir = out / "data" / role, out / "data" / f"{role}-general"
    stats = prepare(_preparation_config(cfg), tokenizer, None)
    store.link(data_dir, Path(stats["dir"]))
    how = "reused, no tokenization" if stats["reused"] else f"prepared in {stats['prepare']['seconds']} s"
    print(f"[ftcluster] eval {role}: eval split of {stats['eval']['examples']} examples from the prepared set "
          f"{stats['dir']} ({how})", flush=True)
    general = write_general_rows(cfg, tokenizer, general_dir) if cfg.eval.general else None
    return {"role": role, "model_dir": model_dir, "adapter_dir": adapter_dir, "data_dir": str(data_dir),
            "general_dir": str(general_dir) if general else None, "pad_id": stats["pad_id"],
            "eval_examples": stats["eval"]["examples"], "eval_tokens": stats["eval"]["trainable_tokens"],
            "prompts": stats["eval_generate"], "general": general}


def write_general_rows(cfg: DictConfig, tokenizer, where: Path) -> dict:
    """The general set as text rows (every token scored), cut and packed like the eval split."""
    max_len = cfg.trainer.max_seq_len
    encoded = [encode_text(text, tokenizer) for text in general_documents(cfg.eval.general)]
    truncated = sum(len(ids) > max_len for ids, _ in encoded)
    encoded = [(ids[:max_len], labels[:max_len]) for ids, labels in encoded]
    rows = pack(encoded, max_len) if cfg.data.packing else unpacked(encoded)
    shutil.rmtree(where, ignore_errors=True)
    with quiet_datasets():
        datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in FEATURES}, features=FEATURES) \
            .save_to_disk(str(where))
    return {"documents": len(encoded), "tokens": sum(label != IGNORE for _, labels in encoded for label in labels),
            "truncated": truncated}


def launch(payload: dict, cfg: DictConfig) -> None:
    if cfg.launcher.workers == 1:
        eval_worker(payload)  # a world of one needs no launcher and no process group
        return
    launcher_for(cfg.launcher.name).launch(eval_worker, payload, cfg)


def collect(payload: dict, out: Path) -> dict[str, dict]:
    work = out / "work"
    results = {}
    for model in payload["models"]:
        path = work / f"{model['role']}.json"
        if not path.is_file():
            raise RuntimeError(f"the eval workers finished but wrote no {path}; see the log above")
        results[model["role"]] = json.loads(path.read_text())
    shutil.rmtree(work)
    return results


def write_outputs(cfg: DictConfig, targets: dict[str, Target], payload: dict, results: dict[str, dict],
                  out: Path) -> Path:
    """eval.json, outputs.jsonl (every prompt with its reference and each model's answer) and eval.md."""
    prompts = _prompts(Path(payload["models"][0]["data_dir"]) / "eval_generate.jsonl") if cfg.eval.metrics else []
    references = [p["reference"] for p in prompts]
    summary = {"models": {}, "data": _data_summary(cfg, payload), "general": None,
               "settings": {"metrics": list(cfg.eval.metrics), "max_new_tokens": cfg.eval.max_new_tokens,
                            "decoding": "greedy", "batch_size": cfg.eval.batch_size,
                            "workers": cfg.launcher.workers, "precision": cfg.strategy.precision}}
    for model in payload["models"]:
        role, result = model["role"], results[model["role"]]
        entry = {"spec": targets[role].spec, "kind": targets[role].kind, "model_dir": model["model_dir"],
                 "adapter_dir": model["adapter_dir"], "loss": result["loss"], "perplexity": _ppl(result["loss"]),
                 "general_loss": result["general_loss"], "general_perplexity": _ppl(result["general_loss"]),
                 "examples": len(result["predictions"]),
                 "metrics": compute(cfg.eval.metrics, result["predictions"], references) if references else {},
                 "seconds": result["seconds"]}
        summary["models"][role] = entry
        if model["general"]:
            summary["general"] = {"path": cfg.eval.general, **model["general"]}
    summary["forgetting"] = _forgetting(summary["models"])
    rows = [{"index": i, "prompt": p["prompt"], "reference": p["reference"],
             **{role: results[role]["predictions"][i] for role in results}} for i, p in enumerate(prompts)]
    write_text(out / "eval.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text(out / "outputs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text(out / "eval.md", report.render(summary, rows, cfg.eval.report_examples))
    _print_summary(summary)
    return out / "eval.md"


def _prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _data_summary(cfg: DictConfig, payload: dict) -> dict:
    first = payload["models"][0]
    return {"path": cfg.data.path, "eval_path": cfg.data.eval_path, "eval_fraction": cfg.data.eval_fraction,
            "format": cfg.data.format, "examples": first["eval_examples"], "prompts": first["prompts"],
            "eval_tokens": first["eval_tokens"], "max_seq_len": cfg.trainer.max_seq_len}


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))  # the cap training's eval_ppl uses


def _forgetting(models: dict) -> dict | None:
    """General-text perplexity before (base) and after (tuned) tuning; ratio > 1: the model got worse at it."""
    before, after = (models.get(role, {}).get("general_perplexity") for role in ("base", "tuned"))
    if before is None or after is None:
        return None
    return {"general_perplexity_before": before, "general_perplexity_after": after, "ratio": after / before}


def _print_summary(summary: dict) -> None:
    for role, entry in summary["models"].items():
        shown = {"perplexity": entry["perplexity"], "general_perplexity": entry["general_perplexity"],
                 **entry["metrics"]}
        print(f"[ftcluster] eval {role}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items() if v is not None))
