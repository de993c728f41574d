"""`ftcluster sweep [overrides]`: compose and check the sweep (ftcluster.sweep.plan), claim or continue its folder
(output_dir), run the trials on the chosen backend, then write the summary.

`sweep.params.KEY=DIST` arguments add one parameter each without Hydra's quoting (Hydra would read choice(...)
as its own sweep syntax); everything else is a Hydra override as for `ftcluster train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ftcluster.config import compose, to_yaml
from ftcluster.errors import ConfigError, UserError, WorkerFailed
from ftcluster.sweep import slurm_backend
from ftcluster.sweep.plan import make_plan
from ftcluster.sweep.summary import BEST_FILE, CSV_FILE, summarize
from ftcluster.run import lock as run_lock
from ftcluster.sweep.trial import STORE_DIR, TRIALS_DIR, TUNE_DIR, trial_store
from ftcluster.util.outputs import claim_folder, mark_folder, read_marker
from ftcluster.util.secrets import redact

SPEC_FILE = "sweep.yaml"
COMMAND = "ftcluster sweep"
_PARAM_PREFIXES = ("sweep.params.", "+sweep.params.")


def sweep(args: list[str]) -> Path:
    overrides, params = split_params(args)
    cfg = compose(overrides)
    with open_dict(cfg.sweep.params):
        cfg.sweep.params.update(params)
    plan = make_plan(cfg)
    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)
    resume = claim(out, cfg, plan.space)
    # After the claim, which compares the settings as given with those of a sweep it continues.
    cfg.data.prepared_dir = trial_store(cfg)
    try:
        return _run(plan, cfg, out, overrides, resume)
    finally:
        run_lock.release(out)


def _run(plan, cfg: DictConfig, out: Path, overrides: list[str], resume: bool) -> Path:
    print(f"[ftcluster] sweep in {out}: {plan.trials} trials, {cfg.sweep.search} search, scheduler "
          f"{cfg.sweep.scheduler}, {cfg.sweep.concurrency} at once, on {cfg.sweep.backend}", flush=True)
    if cfg.sweep.backend == "ray":
        # not at the top: it imports Ray, which sweep.backend=slurm does without
        from ftcluster.sweep import tune_backend

        tune_backend.run(plan, resume)
    else:
        slurm_backend.run(plan, overrides, resume)
    rows = summarize(out, cfg, plan.space)
    for row in rows:
        shown = "-" if row["metric"] is None else f"{row['metric']:.6g}"
        print(f"[ftcluster]   {row['trial']}: {cfg.sweep.metric}={shown} {row['status']} {row['params']}")
    finished = [r for r in rows if r["status"] == "completed" or r["status"].startswith(("stopped", "failed"))]
    if len(finished) < plan.trials:
        # Ray Tune takes Ctrl-C itself and returns early, with the experiment saved.
        print(f"[ftcluster] {plan.trials - len(finished)} of {plan.trials} trials did not finish; continue the sweep "
              f"with resume=auto", file=sys.stderr)
        raise KeyboardInterrupt
    failed = [r for r in rows if r["status"].startswith("failed")]
    if failed:
        raise WorkerFailed(f"{len(failed)} of {len(rows)} trials failed, e.g. {failed[0]['trial']}: "
                           f"{failed[0]['status']}; summary in {out}/{CSV_FILE} (resume=auto runs them again)")
    if not (out / BEST_FILE).is_file():
        raise UserError(f"no trial of the sweep in {out} logged {cfg.sweep.metric}; see {out}/{CSV_FILE}")
    return out / BEST_FILE


def split_params(args: list[str]) -> tuple[list[str], dict]:
    overrides, params = [], {}
    for arg in args:
        prefix = next((p for p in _PARAM_PREFIXES if arg.startswith(p)), None)
        if prefix is None:
            overrides.append(arg)
            continue
        key, sep, expr = arg[len(prefix):].partition("=")
        if not sep or not key:
            raise ConfigError("sweep.params", f"{arg!r}: write sweep.params.KEY=DISTRIBUTION, e.g. "
                                              f"'sweep.params.optim.lr=loguniform(1e-5,1e-3)'")
        params[key] = expr
    return overrides, params


def output_names(space) -> list[str]:
    """Everything a sweep writes in its folder (util/outputs.py's marker lists them): a folder holding anything
    else is not the sweep's to write into. `best` is where best.yaml trains; `tune`, `slurm` and multirun.yaml
    are the backends' own records; `prepared` the trials' data store when they may run on other nodes."""
    return [SPEC_FILE, TRIALS_DIR, CSV_FILE, BEST_FILE, "best", TUNE_DIR, "slurm", "multirun.yaml", run_lock.LOCK_FILE,
            STORE_DIR, *(f"sweep_{param.key}.png" for param in space)]


def claim(out: Path, cfg: DictConfig, space=()) -> bool:
    """The sweep folder: a new one, or (resume=auto) the same sweep continued; a folder of anything else is
    refused untouched. Takes the folder's lock (run/lock.py), so that a second sweep into it is refused naming
    this one; sweep() releases it. Returns whether it continues."""
    if (out / "config.yaml").exists():
        raise ConfigError("output_dir", f"{out} holds a training run, not a sweep; choose another output_dir")
    if cfg.resume not in ("never", "auto"):
        raise ConfigError("resume", f"got {cfg.resume!r}; a sweep continues with resume=auto (each trial from its "
                                    f"own newest checkpoint)")
    # overwrite=True: an earlier sweep's folder passes here, and resume below decides whether it continues.
    claim_folder(out, COMMAND, option="output_dir", overwrite=True)
    run_lock.acquire(out)  # a live sweep there is named and its folder left untouched; sweep() releases it
    try:
        return _continues(out, cfg, space)
    except BaseException:
        run_lock.release(out)
        raise


def _continues(out: Path, cfg: DictConfig, space) -> bool:
    spec = out / SPEC_FILE
    # A sweep refused before its first trial (e.g. by a joined cluster's capacity) has claimed nothing yet.
    started = (out / TRIALS_DIR).is_dir() and any((out / TRIALS_DIR).iterdir())
    if spec.is_file() and started:
        if cfg.resume == "never":
            raise ConfigError("resume", f"output_dir={out} already holds a sweep. Continue it with resume=auto "
                                        f"(finished trials are not run again), or choose another output_dir")
        before, now = _flat(OmegaConf.load(spec)), _flat(cfg)
        changed = sorted(k for k in before.keys() | now.keys() if k != "resume" and before.get(k) != now.get(k))
        if changed:
            key = changed[0]
            raise ConfigError(key, f"the sweep in {out} was started with {key}={before.get(key)!r}, now "
                                   f"{now.get(key)!r}; continue it with the settings in {spec}, or choose another "
                                   f"output_dir")
    # Before the spec: a sweep cut short is still recognised as the sweep's own (names of an earlier space kept).
    earlier = read_marker(out) or {}
    mark_folder(out, COMMAND, {*output_names(space), *earlier.get("names", [])})
    if spec.is_file() and started:
        return True
    spec.write_text(to_yaml(cfg))
    return False


def _flat(cfg) -> dict:
    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    # As the spec file holds it: secrets masked (ftcluster.config.to_yaml), so that a resumed sweep compares alike.
    return dict(walk(redact(OmegaConf.to_container(cfg, resolve=True)), ""))
