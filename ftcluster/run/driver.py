"""`ftcluster train` in the launching process: validate, prepare, record, launch, check the outcome.

Every check that can fail on user input runs here, before any cluster starts: the config, the
output_dir and resume policy, the model folder, and the whole data set (parsed, templated, tokenized
and packed once; workers memory-map the result). Then the stage's runner decides what the launcher
is handed: the worker entry, run on every rank (SPMD stages), or the RL controller, run here with a
placement for its actor groups. The ranks start as soon as the config is valid and import the worker's
libraries while this process does the rest: launcher=processes always, launcher=local once its cluster is up
when the data is prepared in this process (Ray Data's encoders would otherwise wait for their CPUs).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftcluster.config import to_yaml, validate
from ftcluster.errors import StoppedOnRequest
from ftcluster.launch import launcher_for, submitter_for
from ftcluster.launch.cluster import check_address, connect, release_cluster
from ftcluster.launch.entry import EntryByName
from ftcluster.run import lock as run_lock
from ftcluster.stages.registry import STAGES
from ftcluster.train import stop
from ftcluster.train.bundled import resolve_model_path
from ftcluster.util.quiet import quiet_libraries

# The modules that import torch, transformers, datasets or DeepSpeed (seconds) are imported where they are
# used, and a run whose data is prepared uses none of them here (test_data_prepare checks it): the ranks import
# them. The worker entry is named, not imported: it is loaded where it runs.
TRAIN_WORKER = EntryByName("ftcluster.train.worker", "train_worker")


def train(cfg: DictConfig, argv: list[str]) -> Path:
    """The run, holding output_dir's lock (ftcluster.run.lock) from prepare_run until it returns or raises."""
    try:
        return _train(cfg, argv)
    finally:
        run_lock.release(cfg.output_dir)


def _train(cfg: DictConfig, argv: list[str]) -> Path:
    early = _start_early(cfg)
    quiet_libraries()  # for callers other than the CLI (which did it)
    try:
        payload = prepare_run(cfg, argv)
        stop.check_early()  # a stop signal while the data was prepared: exit 75 before any worker runs
        if payload is None:
            print(f"[ftcluster] {cfg.output_dir} is already complete at step {cfg.trainer.max_steps}; final/ is up to date")
            return Path(cfg.output_dir) / "final"
        started = time.time()
        launcher = launcher_for(cfg.launcher.name)
        # From here SIGTERM/SIGUSR1 ask for a checkpoint and exit 75 (before: recorded by cli's stop.stop_early, and
        # one that came after the check above is handed over here)
        with stop.handling_signals(cfg.output_dir):
            if STAGES[cfg.stage.name].runner == "rl":
                from ftcluster.rl.controller import run_controller

                launcher.control(run_controller, payload, cfg)
            elif early is not None:
                early.launch(payload)
            else:
                launcher.launch(TRAIN_WORKER, payload, cfg)
            return _check_outcome(cfg, started)
    finally:
        if early is not None:
            early.close()  # what the run did not use (an error, a stop, nothing left to do) goes


def _start_early(cfg: DictConfig):
    """What a launcher starts before the payload exists (start_early: launcher=processes its ranks, launcher=local
    its cluster), once the config is valid; None for the others, and for a controller (it runs here)."""
    validate(cfg)  # a config error (64 workers...) is said before any process starts
    if cfg.launcher.name == "ray":
        check_address(cfg.launcher.address)  # a cluster that is not there, before output_dir is touched
    start = getattr(launcher_for(cfg.launcher.name), "start_early", None)
    if start is None or STAGES[cfg.stage.name].runner == "rl":
        return None
    from ftcluster.data.parallel import may_use_cluster

    return start(TRAIN_WORKER, cfg, data_on_cluster=may_use_cluster(cfg.data, STAGES[cfg.stage.name].data_kind))


def submit(cfg: DictConfig, overrides: list[str], dry_run: bool) -> int | None:
    """When this invocation only ships the run (a Ray Job, a SLURM job): every check that can refuse it
    here, instead of after a queue wait, then the submission; its exit code. None when the run goes on here."""
    submitter = submitter_for(cfg)
    if submitter is None:
        return None
    quiet_libraries()
    from ftcluster.run.preflight import resolve_resume

    derived = validate(cfg)
    run_lock.check_output_dir(cfg.output_dir)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    resolve_resume(cfg, derived)
    run_lock.check_submission(cfg.output_dir)  # no lock here: the job's own `ftcluster train` takes it
    stop.check_early()  # the last moment a stop signal can keep the job from being submitted
    return submitter.submit(cfg, overrides, dry_run=dry_run)


def prepare_cluster(cfg: DictConfig):
    """Where data.prepare_workers run: on the launcher's Ray cluster (launcher=local starts the one its workers
    will use), or in this process alone when the launcher has no Ray and one worker was asked for."""
    if cfg.launcher.name in ("processes", "inline") and cfg.data.prepare_workers == 1:
        return None
    address = cfg.launcher.address if cfg.launcher.name in ("ray", "slurm") else None
    return lambda: connect(address, dashboard=cfg.launcher.dashboard)


def prepare_run(cfg: DictConfig, argv: list[str]) -> dict | None:
    """Everything before the launch: checks, resume policy, model folder, data, config.yaml and
    manifest.json. Returns the payload every worker entry gets, or None when the run is already complete."""
    from ftcluster.data.reuse import reuse_prepared
    from ftcluster.run.manifest import manifest
    from ftcluster.run.preflight import (already_finished, check_eval_references, check_model, check_rewards,
                                         resolve_resume)
    from ftcluster.train import checkpoint
    from ftcluster.train.model_facts import folder_facts

    derived = validate(cfg)
    if STAGES[cfg.stage.name].runner == "rl":
        check_rewards(cfg)
    check_model(cfg, resolve_model_path(cfg.model.path))
    run_lock.check_output_dir(cfg.output_dir)  # set, and no live run in it: before anything touches it
    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)
    if cfg.stage.dpo.reference_cache_dir:  # workers may run elsewhere than this working directory
        cfg.stage.dpo.reference_cache_dir = str(Path(cfg.stage.dpo.reference_cache_dir).resolve())
    resume_from = resolve_resume(cfg, derived)
    if resume_from is not None and already_finished(cfg, resume_from):
        return None
    stop.check_early()  # a stop signal during the checks: exit 75 with output_dir untouched
    run_lock.claim(out)  # refuses a folder of other files; the lock is held until train() returns
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.start_history(out, resume_from)  # partial saves removed; later checkpoints than resume_from set aside
    if resume_from is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint

    model_dir = resolve_model(cfg, out)
    if cfg.data.prepared_dir is None and cfg.launcher.name in ("ray", "slurm") and not os.environ.get("FTCLUSTER_CACHE"):
        # Workers on other nodes read the prepared set, and this machine's ~/.cache is not theirs; output_dir is
        # on storage every node reads. A shared data.prepared_dir (or FTCLUSTER_CACHE) also reuses sets across runs.
        cfg.data.prepared_dir = str(out / "prepared")
    payload = {"config": OmegaConf.to_container(cfg, resolve=True), "model_dir": model_dir,
               "data_dir": str(out / "data"), "resume_from": str(resume_from) if resume_from else None,
               "launch_id": uuid.uuid4().hex}
    # tracking.progress null: decided here, where the output goes (a rank's output is a pipe or a Ray log file)
    if cfg.tracking.progress is None:
        payload["config"]["tracking"]["progress"] = sys.stderr.isatty()
    stats = reuse_prepared(cfg, folder_facts(model_dir, cfg.model.trust_remote_code).tokenizer, out / "data")
    if stats is None:  # the tokenizer, and the libraries that build a set, only now
        from ftcluster.data.prepare import prepare
        from ftcluster.train.tokenizer import load_tokenizer

        stats = prepare(cfg, load_tokenizer(model_dir, cfg.model.trust_remote_code), out / "data",
                        connect=prepare_cluster(cfg))
    if cfg.launcher.name in ("processes", "inline"):
        release_cluster()  # a Ray started here for the data alone would hold the ranks' cores
    _report_data(cfg, stats)
    if cfg.trainer.eval_generate:
        check_eval_references(cfg, out / "data" / "eval_generate.jsonl")
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "manifest.json").write_text(json.dumps(manifest(cfg, derived, argv, stats), indent=2))
    return payload


def resolve_model(cfg: DictConfig, out: Path) -> str:
    """A local folder every worker can load: bundled models converted, random init materialized."""
    model_dir = resolve_model_path(cfg.model.path)
    if cfg.model.init == "random":
        from ftcluster.train.random_init import materialize_random_init

        model_dir = materialize_random_init(model_dir, out / "init_model", cfg.seed, cfg.model.trust_remote_code)
    return model_dir


def _report_data(cfg: DictConfig, stats: dict) -> None:
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        packing = f", packing efficiency {s['packing_efficiency']:.1%}" if "packing_efficiency" in s else ""
        print(f"[ftcluster] data {split}: {s['examples']} {STAGES[cfg.stage.name].unit} -> {s['rows']} rows, "
              f"{s['tokens']} tokens ({s['trainable_tokens']} trained on), truncated {s['truncated']}, "
              f"dropped {s['dropped']}{packing}")


def _check_outcome(cfg: DictConfig, started: float) -> Path:
    """Ray can end 'successfully' with nothing done (e.g. a worker that returned early): check the files."""
    from ftcluster.train import checkpoint

    out = Path(cfg.output_dir)
    final = out / "final"
    finished = final.is_dir() and final.stat().st_mtime >= started
    requested = stop.request_file(out)
    if requested.exists():
        requested.unlink()
        newest = checkpoint.latest_checkpoint(out)
        if not finished:
            if newest is None or newest.stat().st_mtime < started:
                raise RuntimeError("a stop was requested but the workers wrote no checkpoint; see the log above")
            raise StoppedOnRequest(newest)
    stop_after = cfg.trainer.stop_after_steps
    if stop_after is not None and stop_after < cfg.trainer.max_steps:
        expected = checkpoint.checkpoints_dir(out) / f"step-{stop_after}"
    else:
        expected = out / "final"
    if not expected.is_dir() or expected.stat().st_mtime < started:
        raise RuntimeError(f"the workers finished but {expected} was not written; see the log above")
    return expected
