"""`ftcluster <verb> [hydra overrides]`. Each verb is one function; user errors become one line on
stderr and exit code 2, with no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ftcluster.errors import StoppedOnRequest, UserError, WorkerFailed
from ftcluster.train.stop import StoppedBeforeTraining, check_early, restore, stop_early

USAGE = """usage: ftcluster <command> [options] [key=value ...]

commands:
  train  [overrides] [--dry-run]     fine-tune; e.g. ftcluster train model=tiny strategy=zero3 peft=lora
                                     launcher.workers=2 trainer.max_steps=20 output_dir=runs/demo
                                     launcher=slurm / launcher=ray launcher.address=http://HOST:8265 submit
                                     the run as a job; --dry-run prints what would be submitted
  train  --config FILE [overrides]   the same from a complete config: a run's config.yaml, a sweep's best.yaml
  jobs   list|status|logs|stop [ID] [--address URL]
                                     Ray Jobs on a cluster's dashboard (default $RAY_ADDRESS)
  eval   eval.model=RUN/final|ADAPTER|CHECKPOINT|MODEL [eval.baseline=auto|null|MODEL] [overrides]
                                     perplexity, generation metrics and forgetting, base vs tuned side by
                                     side: <eval.output_dir>/eval.json, outputs.jsonl, eval.md
  export CHECKPOINT [--out DIR] [--merge|--no-merge] [--overwrite]
                                     a Hugging Face folder from any checkpoints/step-N of a run (DIR new or
                                     empty; --overwrite replaces an earlier export there, nothing else)
  config [--config FILE] [overrides] print the composed, validated config and exit
  sweep  sweep=NAME|sweep.params.KEY=DIST [overrides]
                                     trials of the config (Ray Tune: grid, random or Optuna TPE, ASHA or median
                                     stopping; sweep.backend=slurm: one array job) in output_dir/trials/;
                                     sweep.csv, sweep_<param>.png and best.yaml there; resume=auto continues
  bench  suite=NAME [overrides] [--results DIR] [--work DIR] [--cluster PROFILE] [--no-resume] [--overwrite]
                                     run the matrix in conf/bench/NAME.yaml (each cell a short real run);
                                     report in benchmarks/results/<suite>_<hardware>_<date>.md (--overwrite
                                     replaces that day's earlier report); --work: new, or an earlier bench's
                                     work folder, which it continues
  bench  compare A B                 two suites' result files side by side, with ratios B/A
  plan   [overrides] [cluster=NAME] [cluster.KEY=VALUE] [--json] [--all]
                                     per-device memory and step time of ZeRO 0-3 x offload x checkpointing x
                                     micro-batch from the model's config.json alone, and the fastest that fits;
                                     e.g. ftcluster plan model=llama3_70b cluster=h100_sxm cluster.nodes=2
  data   prepare [train overrides]     prepare once what `train` with the same overrides trains on (a
                                     content-addressed set that train, eval and sweep trials reuse); workers:
                                     data.prepare_workers (0: every core of the launcher's cluster)
  data   validate FILE [--format F]   check every record; each bad one as file:line: message (exit 2 if any)
  data   stats FILE [--eval FILE] [--model tiny|smollm2|DIR] [--max-seq-len N] [--chat-template F] [--out DIR]
                                     token lengths per split as training sees them; histogram PNG + stats.json
  data   dedup FILE --out OUT [--near-threshold 0.85] [--overwrite]
                                     drop exact and MinHash near duplicates (first kept); counts and pairs
  data   scrub FILE --out OUT [--phone-region US] [--overwrite]
                                     e-mails, phone numbers, IPv4, API keys and tokens -> [EMAIL], [PHONE], ...
  data   contamination TRAIN EVAL [--ngram 13] [--threshold 0.5] [--out FILE] [--overwrite]
                                     eval examples overlapping train (exact or n-gram share), with lines, rate
  data   split FILE --eval-fraction 0.1 [--seed 0] --out DIR [--overwrite]
                                     a seeded split into DIR/train.jsonl and DIR/eval.jsonl (lines kept as is)
                                     every --out above: new, or the same command's earlier output with
                                     --overwrite; never the input, a run or files of yours

Config groups (conf/): model data stage peft strategy launcher tracking sweep; sections: trainer optim export eval.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The very first thing for train, before the imports that take seconds: a stop signal from here on is
    # recorded and honoured (exit 75, or a checkpoint at the first step), not the default death (143).
    early = stop_early() if argv[:1] == ["train"] else {}
    try:
        return _main(argv)
    finally:
        _release_ray()
        restore(early)


def _release_ray() -> None:
    # A Ray cluster this command started stops now, not in Ray's own exit hook, which first sleeps half a second
    # "so that log messages finish printing" (they have: the command is done).
    if "ray" in sys.modules:
        from ftcluster.launch.cluster import release_cluster

        release_cluster()


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in ("train", "eval", "sweep") and ("--help" in rest or "-h" in rest):  # the rest is Hydra overrides
        print(USAGE)
        return 0
    # Each cmd_* imports what its verb needs when it runs, not at the top: `ftcluster --help` stays instant, and
    # `ftcluster jobs` (which only talks to a dashboard) never imports torch.
    commands = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "config": cmd_config, "jobs": cmd_jobs, "bench": cmd_bench,
                "data": cmd_data, "sweep": cmd_sweep, "plan": cmd_plan}
    if verb not in commands:
        print(f"ftcluster: unknown command {verb!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        from ftcluster.util.quiet import quiet_libraries

        quiet_libraries()  # imports nothing: the libraries read it when (and if) they are imported
        return commands[verb](rest) or 0
    except UserError as exc:
        print(f"ftcluster {verb}: error: {exc}", file=sys.stderr)
        return 2
    except (StoppedOnRequest, StoppedBeforeTraining) as exc:
        print(f"ftcluster {verb}: {exc}", file=sys.stderr)
        return StoppedOnRequest.EXIT_CODE
    except KeyboardInterrupt:
        print(f"ftcluster {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, WorkerFailed) and not os.environ.get("FTCLUSTER_TRACEBACK"):
            print(f"ftcluster {verb}: failed: {exc}", file=sys.stderr)
            return 1
        raise


def cmd_train(overrides: list[str]) -> int:
    dry_run = "--dry-run" in overrides
    overrides = [o for o in overrides if o != "--dry-run"]
    config_file, overrides = _config_file(overrides)
    from ftcluster.config import compose
    from ftcluster.run.driver import submit, train

    cfg = compose(overrides, config_file=config_file)
    check_early()  # a stop signal while Hydra and the config loaded: nothing written yet
    # The job composes the same file (on storage it sees, like output_dir).
    remote = ["--config", str(Path(config_file).resolve())] if config_file else []
    code = submit(cfg, [*remote, *overrides], dry_run=dry_run)
    if code is not None:
        return code
    if dry_run:
        raise UserError(f"--dry-run shows what a job submission would send; launcher={cfg.launcher.name} "
                        f"submits nothing (use launcher=slurm, or launcher=ray with an http:// address)")
    final = train(cfg, ["train", *overrides])
    print(f"[ftcluster] done: {final}")
    return 0


def cmd_eval(overrides: list[str]) -> int:
    from ftcluster.eval.command import eval_command

    report = eval_command(overrides)
    print(f"[ftcluster] eval report: {report}")
    return 0


def _config_file(args: list[str]) -> tuple[str | None, list[str]]:
    """`--config FILE` (or --config=FILE) out of the overrides."""
    for i, arg in enumerate(args):
        if arg == "--config":
            if i + 1 == len(args):
                raise UserError("--config needs a file: ftcluster train --config runs/x/config.yaml [overrides]")
            return args[i + 1], args[:i] + args[i + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def cmd_sweep(overrides: list[str]) -> int:
    from ftcluster.sweep.command import sweep

    best = sweep(overrides)
    print(f"[ftcluster] sweep done; best config: {best}")
    return 0


def cmd_jobs(args: list[str]) -> int:
    from ftcluster.launch.ray_jobs import jobs_command

    return jobs_command(args)


def cmd_config(overrides: list[str]) -> int:
    from ftcluster.config import compose, to_yaml, validate

    config_file, overrides = _config_file(overrides)
    cfg = compose(overrides, config_file=config_file)
    validate(cfg)
    print(to_yaml(cfg), end="")
    return 0


def cmd_export(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftcluster export")
    parser.add_argument("checkpoint", help="a run's checkpoints/step-N folder")
    parser.add_argument("--out", default=None, help="destination (default: <run>/export-step-N)")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                        help="merge LoRA/DoRA weights into the base (default: the run's export.merge)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier `ftcluster export` in --out (never a folder of anything else)")
    ns = parser.parse_args(args)
    from ftcluster.train.export import export_checkpoint

    out = export_checkpoint(ns.checkpoint, ns.out, ns.merge, overwrite=ns.overwrite)
    print(f"[ftcluster] exported {out}")
    return 0


def cmd_bench(args: list[str]) -> int:
    if args[:1] == ["compare"]:
        if len(args) != 3:
            raise UserError("usage: ftcluster bench compare A.jsonl B.jsonl (or their .md reports)")
        from ftcluster.bench.compare import compare

        print(compare(args[1], args[2]))
        return 0
    parser = argparse.ArgumentParser(prog="ftcluster bench", usage="ftcluster bench suite=NAME [overrides] [options]")
    parser.add_argument("--results", default="benchmarks/results", help="where the report and its files go")
    parser.add_argument("--work", default=None, help="where the cells run (default runs/bench/<suite>_<hardware>)")
    parser.add_argument("--cluster", default=None, help="hardware profile in conf/cluster/ (default: the suite's, "
                                                        "else this machine's)")
    parser.add_argument("--no-resume", action="store_true", help="run every cell again")
    parser.add_argument("--overwrite", action="store_true", help="replace this suite's earlier report of today in "
                                                                  "--results (never a file bench did not write)")
    ns, rest = parser.parse_known_args(args)
    suites = [a for a in rest if a.startswith("suite=")]
    if len(suites) != 1:
        from ftcluster.bench.suite import known

        raise UserError(f"name one suite: ftcluster bench suite=NAME; known: {', '.join(known())} (conf/bench/)")
    overrides = [a for a in rest if not a.startswith("suite=")]
    from ftcluster.bench.main import bench

    report = bench(suites[0].split("=", 1)[1], overrides, ns.results, ns.work, ns.cluster, resume=not ns.no_resume,
                   overwrite=ns.overwrite)
    print(f"[ftcluster] bench report: {report}")
    return 0


def cmd_plan(args: list[str]) -> int:
    from ftcluster.plan.command import plan_command

    return plan_command(args)


def cmd_data(args: list[str]) -> int:
    from ftcluster.data.tools.command import data_command

    return data_command(args)


if __name__ == "__main__":
    sys.exit(main())
