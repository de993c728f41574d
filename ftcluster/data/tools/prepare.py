"""`ftcluster data prepare [train's overrides]`: the set `ftcluster train` with the same overrides would train
on, prepared into the store now (on every core of this machine or of the launcher's Ray cluster), so the
run itself, its evals and a sweep's trials start at once. Prints what was prepared and how fast."""

from __future__ import annotations

import time

from ftcluster.config import compose
from ftcluster.data.parallel import may_use_cluster
from ftcluster.data.reuse import reuse_prepared
from ftcluster.launch.cluster import start_local
from ftcluster.run.driver import prepare_cluster
from ftcluster.stages.registry import STAGES
from ftcluster.train.bundled import resolve_model_path
from ftcluster.train.model_facts import folder_facts


def prepare_command(overrides: list[str]) -> int:
    cfg = compose(overrides)
    model_dir = resolve_model_path(cfg.model.path)
    started = time.monotonic()
    # A set in the store is found from the model folder's facts, without the libraries that build one.
    stats = reuse_prepared(cfg, folder_facts(model_dir, cfg.model.trust_remote_code).tokenizer, None)
    if stats is None:
        stats, started = _prepare(cfg, model_dir)
    print(report(stats, time.monotonic() - started))
    return 0


def _prepare(cfg, model_dir: str) -> tuple[dict, float]:
    """The set prepared, and when its preparation began (after the libraries' imports and the tokenizer)."""
    # The cluster `train` would prepare on; a local one is started now when the preparation may use it: its start
    # (seconds) overlaps the imports and the tokenizer's load.
    early = None
    if cfg.launcher.name not in ("ray", "slurm") and may_use_cluster(cfg.data, STAGES[cfg.stage.name].data_kind):
        early = start_local(cfg.launcher.dashboard)
    try:
        from ftcluster.data.prepare import prepare  # torch, transformers and datasets: seconds
        from ftcluster.train.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
        started = time.monotonic()
        return prepare(cfg, tokenizer, None, connect=prepare_cluster(cfg)), started
    finally:
        if early is not None:
            early.finish()  # a refusal waits for the start: Ray's shutdown at exit must not race it


def report(stats: dict, wall_s: float) -> str:
    lines = []
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        packing = f", packing efficiency {s['packing_efficiency']:.1%}" if "packing_efficiency" in s else ""
        lines.append(f"{split}: {s['records']} records -> {s['examples']} examples, {s['tokens']} tokens "
                     f"({s['trainable_tokens']} trained on) -> {s['rows']} rows{packing}; truncated "
                     f"{s['truncated']}, dropped {s['dropped']}")
        for source in s.get("sources", []):
            lines.append(f"  {source['path']} (weight {source['weight']}): {source['examples']} examples, "
                         f"{source['proportion']:.1%} of the mixture")
    done = stats["prepare"]
    tokens = sum(stats[s]["tokens"] for s in ("train", "eval") if s in stats)
    if stats["reused"]:
        lines.append(f"reused {stats['dir']} (prepared in {done['seconds']} s by {done['workers']} workers); "
                     f"this call {wall_s:.1f} s")
    else:
        phases = (f" (reading and encoding {done['encode_s']} s, packing and writing the rows "
                  f"{done['assemble_s']} s)") if "encode_s" in done else ""
        lines.append(f"prepared {stats['dir']} in {wall_s:.1f} s with {done['workers']} worker"
                     f"{'s' * (done['workers'] > 1)}: {stats['train']['records'] / max(wall_s, 1e-9):,.0f} records/s, "
                     f"{tokens / max(wall_s, 1e-9):,.0f} tokens/s{phases}")
    lines.append(f"rows_digest {stats['rows_digest']}")
    return "\n".join(lines)
