"""`ftcluster plan [overrides] [cluster=NAME] [cluster.KEY=VALUE] [--json] [--all] [--max-micro-batch N]`."""

from __future__ import annotations

import argparse
import copy

from ftcluster.config import compose, validate
from ftcluster.config.precision import precision_for
from ftcluster.errors import ConfigError, UserError
from ftcluster.plan.planner import plan
from ftcluster.plan.profiles import load_profile
from ftcluster.plan.report import as_json, as_table


def plan_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftcluster plan", usage="ftcluster plan [overrides] [cluster=NAME] "
                                     "[cluster.KEY=VALUE] [--json] [--all] [--max-micro-batch N]")
    parser.add_argument("--json", action="store_true", help="print every candidate as JSON")
    parser.add_argument("--all", action="store_true", help="a row per candidate, not per strategy")
    parser.add_argument("--max-micro-batch", type=int, default=16, help="largest micro-batch tried (powers of 2)")
    ns, rest = parser.parse_known_args(args)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        raise UserError(f"unknown option {unknown[0]}; {parser.usage}")
    # The hardware profile is not part of the train config: cluster=... and cluster.*=... are the planner's.
    clusters = [a.split("=", 1)[1] for a in rest if a.startswith("cluster=")]
    cluster_overrides = [a[len("cluster."):] for a in rest if a.startswith("cluster.")]
    overrides = [a for a in rest if not a.startswith(("cluster=", "cluster."))]

    cfg = compose(overrides)
    if cfg.peft.method == "qlora":
        raise ConfigError("peft.method", "the planner does not model QLoRA's 4-bit weights; plan with peft=lora, "
                                         "an upper bound on what the weights need")
    # The planner picks the strategy, the number of devices and the micro-batch; everything else is checked
    # as `ftcluster train` would, with one worker and one micro-batch so those checks hold.
    checked = copy.deepcopy(cfg)
    checked.launcher.workers, checked.trainer.global_batch = 1, checked.trainer.micro_batch_per_device
    validate(checked, check_paths=False)
    profile = load_profile(clusters[-1] if clusters else "cpu", cluster_overrides, cfg.launcher.cpus_per_worker)
    # strategy.precision=auto means what it would on the planned hardware, not on this machine.
    cfg.strategy.precision = precision_for(cfg.strategy.precision, on_gpu=profile.device == "gpu")
    # A global batch given on the command line is kept; the recipe's default is for its own 2 workers.
    global_batch = cfg.trainer.global_batch if any(o.startswith("trainer.global_batch=") for o in overrides) else None
    result = plan(cfg, profile, global_batch=global_batch, max_micro_batch=ns.max_micro_batch)
    print(as_json(result) if ns.json else as_table(result, every_candidate=ns.all))
    return 0
