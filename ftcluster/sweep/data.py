"""A sweep's data: prepared once, before its first trial, for every trial that trains on it.

Trials that differ only in settings that do not shape the data (a learning rate, a LoRA rank) train on one
prepared set. Before any trial starts, the sweep computes the data fingerprint of each trial's config
(prepare.prepared_key: the data files, the tokenizer and every setting that shapes the rows), prepares each
distinct set once, here, on the sweep's cluster, and each trial's `ftcluster train` then finds its set in the
store and says "reusing the prepared set" in its log instead of tokenizing again. A swept key that does shape
the data (trainer.max_seq_len, data.*) gives one set per distinct value, each prepared once.

The trials are known before they start for a grid (every point), and whenever no swept key changes the
fingerprint at any of its probe values (then one set serves every trial, whatever Ray Tune draws). Otherwise,
random or Optuna search over a key that shapes the data, the points are drawn as the sweep goes and each trial
prepares its set; the store's lock per fingerprint keeps two trials from preparing the same set at once (the
second waits, then reuses it). So do the array tasks of sweep.backend=slurm, whose preparation belongs inside the
allocation, not on the login node that submits the sweep: there, every task is pointed at one store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from ftcluster.sweep.plan import Plan
from ftcluster.sweep.space import grid_points
from ftcluster.sweep.trial import TRIALS_DIR, trial_config, wandb_group


def prepare_before_trials(plan: Plan, log: Callable[[str], None] = print) -> list[dict]:
    """Prepare each distinct set the trials will train on, once, in this process (on the Ray cluster it is
    connected to, for data.prepare_workers); returns each set's stats, [] when the trials prepare their own."""
    from ftcluster.data.prepare import prepare  # not at the top: it imports datasets, which plan checks do without

    keys = _Fingerprints(plan.cfg)
    shaping = [p.key for p in plan.space if any(keys.of({p.key: v}) != keys.of({}) for v in p.probes())]
    if not shaping:
        points = [{}]
    elif plan.cfg.sweep.search == "grid":
        points = grid_points(plan.space)
    else:
        log(f"[ftcluster] sweep: {', '.join(shaping)} shape{'s' * (len(shaping) == 1)} the data and "
            f"{plan.cfg.sweep.search} search draws its values as the sweep goes: each trial prepares its set, and "
            f"trials with the same data share one (the second waits for the first)")
        return []
    distinct: dict[str, dict] = {}
    for point in points:
        distinct.setdefault(keys.of(point), point)
    swept = ", ".join(p.key for p in plan.space)
    why = (f"{', '.join(shaping)} shape{'s' * (len(shaping) == 1)} the data" if shaping
           else f"the swept {swept} leave{'s' * (len(plan.space) == 1)} the data unchanged")
    log(f"[ftcluster] sweep: its {plan.trials} trials train on {len(distinct)} prepared data "
        f"set{'s' * (len(distinct) > 1)} ({why}); preparing {'each' if len(distinct) > 1 else 'it'} once, "
        f"before the first trial")
    prepared = []
    for key, point in distinct.items():
        cfg = keys.config(point)
        stats = prepare(cfg, keys.tokenizer(cfg), None, log=log)
        shown = f" for {', '.join(f'{k}={point[k]!r}' for k in shaping)}" if shaping else ""
        log(f"[ftcluster] sweep: data set{shown}: {stats['train']['rows']} rows, {stats['train']['tokens']} tokens, "
            f"{'already prepared' if stats['reused'] else 'prepared in %s s' % stats['prepare']['seconds']} "
            f"({stats['dir']})")
        prepared.append(stats)
    return prepared


class _Fingerprints:
    """The data fingerprint of a trial's config, by its swept values; tokenizers loaded once per model."""

    def __init__(self, base: DictConfig):
        self.base = base
        self.tokenizers: dict[tuple, object] = {}
        self.keys: dict[tuple, str] = {}

    def config(self, point: dict) -> DictConfig:
        # The trial's own config, as the backend makes it (its folder's name does not shape the data).
        return trial_config(self.base, point, Path(self.base.output_dir) / TRIALS_DIR / "data", wandb_group(self.base))

    def tokenizer(self, cfg: DictConfig):
        """The tokenizer a trial's run loads: its model folder's, with data.chat_template applied (by
        prepared_key), so one per model and template."""
        from ftcluster.train.bundled import resolve_model_path
        from ftcluster.train.tokenizer import load_tokenizer

        # A random-init model's run loads the tokenizer from its materialized copy, the same files re-saved.
        wanted = (cfg.model.path, cfg.model.trust_remote_code, cfg.data.chat_template)
        if wanted not in self.tokenizers:
            self.tokenizers[wanted] = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
        return self.tokenizers[wanted]

    def of(self, point: dict) -> str:
        from ftcluster.data.prepare import prepared_key

        frozen = tuple(sorted((k, repr(v)) for k, v in point.items()))
        if frozen not in self.keys:
            cfg = self.config(point)
            self.keys[frozen] = prepared_key(cfg, self.tokenizer(cfg))
        return self.keys[frozen]
