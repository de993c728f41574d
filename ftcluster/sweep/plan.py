"""Everything about a sweep that can be refused is refused here, before any cluster or trial starts: the base
config, the search space against the schema (every key must exist, every value must pass validate()), the
search and scheduler settings, and whether `concurrency` trials fit on this machine at once."""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config import TrainConfig, validate
from ftcluster.errors import ConfigError, UserError
from ftcluster.sweep.space import FINITE, Param, grid_points, parse_space

CHOICES = {"sweep.search": ("grid", "random", "optuna"), "sweep.scheduler": ("asha", "median", "none"),
           "sweep.mode": ("min", "max"), "sweep.backend": ("ray", "slurm")}
# Set by the sweep for every trial, so not something a trial can vary.
CONTROLLED = ("output_dir", "resume", "sweep", "launcher", "tracking.wandb.group", "tracking.wandb.name")
_ABSENT = object()


@dataclass
class Plan:
    cfg: DictConfig  # the base config every trial starts from, validated
    space: list[Param]
    trials: int


def make_plan(cfg: DictConfig) -> Plan:
    validate(cfg)
    s = cfg.sweep
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(key, f"got {OmegaConf.select(cfg, key)!r}; it must be {', '.join(allowed[:-1])} or "
                                   f"{allowed[-1]}")
    if not s.params:
        raise ConfigError("sweep.params", "no search space: pick one with sweep=NAME (conf/sweep/) or give one "
                                          "parameter at a time, e.g. 'sweep.params.optim.lr=loguniform(1e-5,1e-3)'")
    space = parse_space(OmegaConf.to_container(s.params))
    for param in space:
        _check_key(param)
        for value in param.probes():
            check_point(cfg, {param.key: value}, param.where)
    trials = _count_trials(cfg, space)
    if s.backend == "slurm":
        _check_slurm(cfg)
    _check_settings(cfg)
    if s.search == "grid":  # few enough to check every combination
        for point in grid_points(space):
            check_point(cfg, point, "sweep.params")
    if s.backend == "ray":
        _check_ray_launcher(cfg)
        if cfg.launcher.name == "local":
            check_concurrency(cfg, os.cpu_count() or 1, _local_gpus(cfg))
    return Plan(cfg=cfg, space=space, trials=trials)


def _check_key(param: Param) -> None:
    schema = OmegaConf.structured(TrainConfig)
    if any(param.key == c or param.key.startswith(f"{c}.") for c in CONTROLLED):
        raise ConfigError(param.where, f"{param.key} is set by the sweep for each trial (or is the same for all of "
                                       f"them: the placement is launcher.*, outside sweep.params); sweep a "
                                       f"training setting such as optim.lr or peft.r instead")
    parent, _, leaf = param.key.rpartition(".")
    node = OmegaConf.select(schema, parent, default=_ABSENT) if parent else schema
    if not isinstance(node, DictConfig) or leaf not in node:
        keys = f"keys of {parent}: {', '.join(map(str, node.keys()))}" if isinstance(node, DictConfig) else \
            f"top-level keys: {', '.join(map(str, schema.keys()))}"
        raise ConfigError(param.where, f"{param.key} is not a config key ({keys})")
    if isinstance(node[leaf], DictConfig):
        raise ConfigError(param.where, f"{param.key} is a section, not a value; sweep one of its keys: "
                                       f"{', '.join(f'{param.key}.{k}' for k in node[leaf].keys())}")


def _count_trials(cfg: DictConfig, space: list[Param]) -> int:
    s = cfg.sweep
    if s.search == "grid":
        ranged = [p.key for p in space if p.kind not in FINITE]
        if ranged:
            raise ConfigError("sweep.search", f"a grid needs a finite set of values; {', '.join(ranged)} "
                                              f"{'is a range' if len(ranged) == 1 else 'are ranges'}: use grid(...) "
                                              f"or choice(...) for it, or sweep.search=random|optuna")
        size = len(grid_points(space))
        if s.trials is not None and s.trials != size:
            raise ConfigError("sweep.trials", f"the grid has {size} points and search=grid runs each once; set "
                                              f"sweep.trials={size} or leave it null")
        return size
    gridded = [p.key for p in space if p.kind == "grid"]
    if gridded:
        raise ConfigError(f"sweep.params.{gridded[0]}", f"grid(...) enumerates values for sweep.search=grid; with "
                                                        f"search={s.search} write choice(...)")
    if s.trials is None or s.trials < 1:
        raise ConfigError("sweep.trials", f"search={s.search} needs a number of trials, e.g. sweep.trials=16")
    return s.trials


def _check_settings(cfg: DictConfig) -> None:
    s, t = cfg.sweep, cfg.trainer
    if s.concurrency < 1:
        raise ConfigError("sweep.concurrency", f"got {s.concurrency}; it must be a positive integer")
    if not s.reduction_factor > 1:
        raise ConfigError("sweep.reduction_factor", f"got {s.reduction_factor}; it must be above 1 (2 keeps half "
                                                    f"of the trials at each rung)")
    if not 1 <= s.grace_steps <= t.max_steps:
        raise ConfigError("sweep.grace_steps", f"got {s.grace_steps}; it must be between 1 and "
                                               f"trainer.max_steps={t.max_steps}")
    if s.metric.startswith("eval_") and cfg.data.eval_path is None and not cfg.data.eval_fraction:
        raise ConfigError("sweep.metric", f"{s.metric} is measured on held-out data and there is none: set "
                                          f"data.eval_path=FILE or data.eval_fraction=0.1")
    if s.scheduler != "none" and s.metric.startswith("eval_") and not t.eval_every_steps:
        raise ConfigError("trainer.eval_every_steps", f"sweep.scheduler={s.scheduler} compares trials at each "
                                                      f"evaluation, and with 0 there is only the last one; set "
                                                      f"it to a divisor of sweep.grace_steps={s.grace_steps}, "
                                                      f"e.g. trainer.eval_every_steps={s.grace_steps}")


def check_point(cfg: DictConfig, point: dict, where: str) -> None:
    """The base config with these values passes validate(): a value a trial would refuse, refused now."""
    trial = copy.deepcopy(cfg)
    for key, value in point.items():
        try:
            OmegaConf.update(trial, key, value, merge=False)
        except OmegaConfBaseException as exc:
            hint = " (an integer: sweep it with randint(a, b) or choice(...))" if isinstance(value, float) else ""
            raise ConfigError(where, f"{key}={value!r} does not fit that key: "
                                     f"{str(exc).splitlines()[0]}{hint}") from None
    try:
        validate(trial, check_paths=False)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
        raise ConfigError(where, f"with {shown}: {exc}") from None


def check_concurrency(cfg: DictConfig, cpus: float, gpus: float) -> None:
    """`concurrency` trials, each with its own workers, fit at once; said before any trial starts."""
    s, launcher = cfg.sweep, cfg.launcher
    use_gpu = launcher.use_gpu if launcher.use_gpu is not None else gpus > 0
    per_trial = launcher.workers * launcher.cpus_per_worker
    fits = int(cpus // per_trial)
    if use_gpu:
        fits = min(fits, int(gpus // launcher.workers))
    if s.concurrency > fits:
        need = f"{s.concurrency * per_trial} CPUs" + (f" and {s.concurrency * launcher.workers} GPUs" if use_gpu else "")
        have = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if use_gpu else "")
        raise ConfigError("sweep.concurrency", f"{s.concurrency} trials at once x launcher.workers={launcher.workers} "
                                               f"x launcher.cpus_per_worker={launcher.cpus_per_worker} need {need}; "
                                               f"the cluster has {have}. Use sweep.concurrency={max(fits, 1)}"
                                               + (" (and fewer workers per trial)" if fits < 1 else ""))


def _local_gpus(cfg: DictConfig) -> int:
    if cfg.launcher.use_gpu is False:
        return 0
    import torch  # not at the top: a sweep's checks need torch only to count this machine's GPUs

    return torch.cuda.device_count()


def _check_ray_launcher(cfg: DictConfig) -> None:
    launcher = cfg.launcher
    if launcher.name == "processes":
        raise ConfigError("launcher.name", "sweep.backend=ray runs its trials as Ray Tune trials; use "
                                           "launcher=local (or launcher=ray to join a cluster)")
    if launcher.name == "slurm":
        raise ConfigError("sweep.backend", "launcher=slurm submits one run as a batch job; a sweep on SLURM is "
                                           "sweep.backend=slurm (one array job, a task per point)")
    if launcher.name == "ray" and str(launcher.address).startswith(("http://", "https://")):
        raise ConfigError("launcher.address", "a sweep drives its trials from this process: join the cluster with "
                                              "launcher.address=HOST:6379 rather than submitting a Ray Job")


def _check_slurm(cfg: DictConfig) -> None:
    s = cfg.sweep
    if s.scheduler != "none":
        raise ConfigError("sweep.scheduler", f"sweep.backend=slurm submits every point at once as an array job, "
                                             f"so nothing can stop one on the others' results; use "
                                             f"sweep.scheduler=none, or sweep.backend=ray for {s.scheduler}")
    if s.search == "optuna":
        raise ConfigError("sweep.search", "TPE picks each trial from the results so far, and sweep.backend=slurm "
                                          "submits every point at once; use search=grid or random, or "
                                          "sweep.backend=ray")
    if cfg.launcher.nodes != 1:
        raise ConfigError("launcher.nodes", "each point of sweep.backend=slurm runs on one node (its array task); "
                                            "use launcher.nodes=1")
    missing = [tool for tool in ("sbatch", "squeue", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"sweep.backend=slurm needs the SLURM client tools on PATH; missing: {', '.join(missing)}. "
                        f"Run from a login node, or bring up a local cluster with slurm/local/up.sh (root)")
