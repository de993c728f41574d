"""`ftcluster sweep`: a 4-trial ASHA sweep on the tiny model through Ray Tune on this process's Ray cluster, run
again to continue it (nothing reruns), its best.yaml composed by `ftcluster train --config` as it is; a 2-point
grid as one array job on the local SLURM cluster through Hydra's submitit launcher; the search space parser;
refusals before anything starts."""

import csv
import math
import os

import pytest
from omegaconf import OmegaConf, open_dict

from helpers import TINY, cli, refused
from ftcluster.cli import main
from ftcluster.sweep.space import grid_points, parse, random_points
from ftcluster.observe.track import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
ONE_WORKER = [*TINY, "launcher.workers=1"]
# The good learning rates go first: the two weak ones start once the first two have passed the step-2 rung, where
# ASHA (keeping half) compares them with those two and stops them. Evaluation every 2 of 8 steps.
ASHA = [*ONE_WORKER, "sweep.params.optim.lr=grid(3e-3, 1e-2, 1e-5, 1e-6)", "sweep.search=grid",
        "sweep.scheduler=asha", "sweep.grace_steps=2", "sweep.reduction_factor=2", "sweep.concurrency=2",
        "trainer.max_steps=8", "trainer.eval_every_steps=2"]


def sweep(capsys, *args):
    code = main(["sweep", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(sweep_dir):
    return list(csv.DictReader((sweep_dir / "sweep.csv").open()))


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "asha"
    assert main(["sweep", *ASHA, f"output_dir={out}"]) == 0
    return out


@pytest.mark.slow
def test_asha_sweep_stops_a_trial_early_and_writes_the_summary(asha_sweep):
    rows = table(asha_sweep)
    assert sorted(float(r["optim.lr"]) for r in rows) == [1e-6, 1e-5, 3e-3, 1e-2]
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses)  # sorted by the metric, best first
    stopped = [r for r in rows if r["status"].startswith("stopped early at step ")]
    assert stopped, rows
    for r in rows:
        trial = asha_sweep / "trials" / r["trial"]
        evaluations = [m for m in read_metrics(trial) if "eval_loss" in m]
        # The metric is the trial's own last evaluation.
        assert float(r["eval_loss"]) == evaluations[-1]["eval_loss"] and int(r["step"]) == evaluations[-1]["step"]
        cfg = OmegaConf.load(trial / "config.yaml")
        assert cfg.optim.lr == float(r["optim.lr"]) and cfg.output_dir == str(trial)
        assert cfg.tracking.wandb.group == asha_sweep.name  # one wandb group per sweep
        if r in stopped:  # stopped cleanly: a checkpoint at the step it stopped after, no final/
            step = int(r["status"].rsplit(" ", 1)[1])
            assert 2 <= step < 8 and (trial / "checkpoints" / f"step-{step}").is_dir(), r
            assert not (trial / "final").exists()
        else:
            assert r["status"] == "completed" and (trial / "final" / "model.safetensors").is_file(), r
            assert evaluations[-1]["step"] == 8
    assert (asha_sweep / "sweep_optim.lr.png").read_bytes()[:8] == PNG

    best = OmegaConf.load(asha_sweep / "best.yaml")
    completed = [r for r in rows if r["status"] == "completed"]
    assert best.optim.lr == float(completed[0]["optim.lr"])  # the best completed trial, by the metric
    assert float(completed[0]["eval_loss"]) == min(float(r["eval_loss"]) for r in completed)
    trial_cfg = OmegaConf.load(asha_sweep / "trials" / completed[0]["trial"] / "config.yaml")
    assert best.output_dir == str(asha_sweep / "best") and best.resume == "never" and not best.sweep.params
    for section in ("model", "data", "peft", "strategy", "trainer", "optim"):
        assert best[section] == trial_cfg[section], section


@pytest.mark.slow
def test_a_sweep_started_again_reruns_nothing(asha_sweep, capsys):
    files = {p: p.stat().st_mtime_ns for p in (asha_sweep / "trials").rglob("*") if p.is_file()}
    before = table(asha_sweep)
    code, _, err = sweep(capsys, *ASHA, f"output_dir={asha_sweep}")
    assert code == 2 and "already holds a sweep" in err and "resume=auto" in err
    code, out, _ = sweep(capsys, *ASHA, f"output_dir={asha_sweep}", "resume=auto")
    assert code == 0, out[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (asha_sweep / "trials").rglob("*") if p.is_file()} == files
    assert table(asha_sweep) == before
    code, _, err = sweep(capsys, *ASHA, f"output_dir={asha_sweep}", "resume=auto", "trainer.max_steps=10")
    assert code == 2 and "config key 'trainer.max_steps'" in err and "was started with" in err


@pytest.mark.slow
def test_best_yaml_is_a_config_train_takes_as_it_is(asha_sweep, capsys):
    """`ftcluster train --config best.yaml`, no override: the best trial's config, as a new run in <sweep>/best."""
    best = asha_sweep / "best.yaml"
    assert main(["config", "--config", str(best)]) == 0  # composed and validated as `train` does
    composed = OmegaConf.create(capsys.readouterr().out)
    # The best completed trial (an early-stopped one can show a lower loss at its last evaluation).
    best_trial = next(r for r in table(asha_sweep) if r["status"] == "completed")
    trial = OmegaConf.load(asha_sweep / "trials" / best_trial["trial"] / "config.yaml")
    for cfg in (composed, trial):
        for key in ("output_dir", "resume", "sweep", "tracking.wandb.name"):
            OmegaConf.update(cfg, key, None, merge=False)
    assert composed == trial


@pytest.mark.slow
def test_two_point_multirun_on_slurm(slurm, tmp_path, capsys):
    out = tmp_path / "multirun"
    # One task at a time (the array's %1): two Ray clusters starting at once on a loaded 2-core machine can miss
    # Ray's fixed 30 s node start-up deadline.
    args = [*ONE_WORKER, "sweep.params.optim.lr=grid(3e-3, 1e-2)", "sweep.search=grid", "sweep.backend=slurm",
            "sweep.concurrency=1", "trainer.max_steps=2", f"output_dir={out}"]
    # The console command in its own process, as a user runs it: Hydra's launcher configures logging and
    # submitit's watcher threads there, not in this test session.
    result = cli("sweep", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table(out)
    assert [r["trial"] for r in sorted(rows, key=lambda r: r["trial"])] == ["point_000", "point_001"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for r in rows:
        point = out / "trials" / r["trial"]
        lr = {"point_000": 3e-3, "point_001": 1e-2}[r["trial"]]
        assert OmegaConf.load(point / "config.yaml").optim.lr == lr and float(r["optim.lr"]) == lr
        assert f"optim.lr={lr!r}" in OmegaConf.load(point / ".hydra" / "overrides.yaml")  # Hydra's own job record
        assert float(r["eval_loss"]) == [m for m in read_metrics(point) if "eval_loss" in m][-1]["eval_loss"]
        assert (point / "final" / "model.safetensors").is_file()
    # One array job, one task per point, one at a time.
    (launch,) = (out / "slurm").iterdir()
    submitted = sorted(p.name for p in launch.glob("*_submitted.pkl"))
    array = submitted[0].split("_")[0]
    assert submitted == [f"{array}_0_submitted.pkl", f"{array}_1_submitted.pkl"]
    assert "#SBATCH --array=0-1%1" in (launch / f"{array}_submission.sh").read_text()
    assert OmegaConf.load(out / "best.yaml").optim.lr == float(rows[0]["optim.lr"])
    # Continued, it finds every point finished and submits nothing (in this process: it launches nothing).
    code, stdout, err = sweep(capsys, *args, "resume=auto")
    assert code == 0 and "nothing to submit" in stdout, err[-3000:]
    assert len(list((out / "slurm").iterdir())) == 1


@pytest.mark.parametrize("extra, key, says", [
    (["sweep.params.optim.lrr=loguniform(1e-5,1e-3)"], "sweep.params.optim.lrr", "not a config key (keys of optim: lr"),
    (["sweep.params.optim.lr=logunif(1e-5,1e-3)"], "sweep.params.optim.lr", "unknown distribution 'logunif'"),
    (["sweep.params.optim.lr=loguniform(0,1e-3)"], "sweep.params.optim.lr", "bounds must be positive"),
    (["sweep.params.optim.lr=loguniform(1e-5,1e-3)", "launcher=processes"], "launcher.name",
     "runs its trials as Ray Tune trials"),
])
def test_bad_search_spaces_are_refused_through_the_cli(capsys, tmp_path, extra, key, says):
    err = refused(capsys, "sweep", *ONE_WORKER, *extra, "sweep.trials=2", f"output_dir={tmp_path / 'sweep'}")
    assert f"config key '{key}'" in err and says in err, err
    assert not (tmp_path / "sweep").exists()


@pytest.fixture(scope="module")
def base_cfg():
    from ftcluster.config import compose

    return compose([*ONE_WORKER, "output_dir=unused"])


@pytest.mark.parametrize("sweep_keys, key, says", [
    ({"params": {"optim": "choice(1,2)"}, "trials": 2}, "sweep.params.optim", "is a section"),
    ({"params": {"peft.r": "uniform(4,32)"}, "trials": 2}, "sweep.params.peft.r", "randint(a, b) or choice"),
    ({"params": {"peft.r": "choice(8,0)"}, "trials": 2}, "sweep.params.peft.r", "with peft.r=0: config key 'peft.r'"),
    ({"params": {"output_dir": "choice(a,b)"}, "trials": 2}, "sweep.params.output_dir", "set by the sweep"),
    ({"params": {"optim.lr": "loguniform(1e-5,1e-3)"}, "search": "grid"}, "sweep.search", "finite set of values"),
    ({"params": {"optim.lr": "grid(1e-3,1e-2)"}, "search": "grid", "trials": 3}, "sweep.trials", "has 2 points"),
    ({"params": {"optim.lr": "grid(1e-3,1e-2)"}, "trials": 2}, "sweep.params.optim.lr", "write choice(...)"),
    ({"params": {"optim.lr": "loguniform(1e-5,1e-3)"}}, "sweep.trials", "needs a number of trials"),
    ({"params": {"optim.lr": "choice(1e-3,1e-2)"}, "trials": 2, "scheduler": "asha"}, "trainer.eval_every_steps",
     "compares trials at each evaluation"),
    ({"params": {"optim.lr": "choice(1e-3,1e-2)"}, "trials": 2, "grace_steps": 99}, "sweep.grace_steps",
     "between 1 and trainer.max_steps"),
    ({"params": {"optim.lr": "choice(1e-3,1e-2)"}, "trials": 2, "backend": "slurm", "scheduler": "asha"},
     "sweep.scheduler", "every point at once"),
    ({"params": {"optim.lr": "choice(1e-3,1e-2)"}, "trials": 2, "backend": "slurm", "search": "optuna"},
     "sweep.search", "TPE picks each trial"),
    ({"params": {"optim.lr": "choice(1e-3,1e-2)"}, "trials": 2, "search": "bayes"}, "sweep.search",
     "grid, random or optuna"),
    ({}, "sweep.params", "no search space"),
])
def test_bad_sweeps_are_refused_by_the_plan(base_cfg, sweep_keys, key, says):
    """What `ftcluster sweep` checks after composing (the CLI path above), on one composed config."""
    import copy

    from ftcluster.errors import ConfigError
    from ftcluster.sweep.plan import make_plan

    cfg = copy.deepcopy(base_cfg)
    settings = dict(sweep_keys)
    with open_dict(cfg.sweep.params):  # (a free-form mapping, as `ftcluster sweep` fills it)
        cfg.sweep.params.update(settings.pop("params", {}))
    for name, value in settings.items():
        cfg.sweep[name] = value
    with pytest.raises(ConfigError) as refused:
        make_plan(cfg)
    assert refused.value.key == key and says in str(refused.value), refused.value


@pytest.mark.parametrize("expr, says", [
    ("loguniform(1e-5)", "takes two numbers"), ("uniform(1e-3, 1e-5)", "lower bound must be below"),
    ("randint(1.5, 4)", "two integers"), ("choice()", "at least one value"), ("loguniform", "not a distribution"),
    ("loguniform(1e-5, __import__('os'))", "not a plain value"), ("choice(8, lr=3)", "not a distribution"),
    ("uniform(0, inf)", "takes two numbers"),
])
def test_bad_expressions(expr, says):
    from ftcluster.errors import ConfigError

    with pytest.raises(ConfigError, match="sweep.params.optim.lr") as refused:
        parse("optim.lr", expr)
    assert says in str(refused.value)


def test_concurrency_that_cannot_fit_is_refused_before_any_trial(capsys, tmp_path):
    cpus = os.cpu_count()
    code, _, err = sweep(capsys, *ONE_WORKER, "sweep.params.optim.lr=choice(1e-3,1e-2)", "sweep.trials=4",
                         f"sweep.concurrency={cpus + 1}", f"output_dir={tmp_path / 'sweep'}")
    assert code == 2 and "config key 'sweep.concurrency'" in err, err
    assert f"need {cpus + 1} CPUs; the cluster has {cpus} CPUs. Use sweep.concurrency={cpus}" in err
    assert not (tmp_path / "sweep").exists()


def test_search_space_expressions():
    assert parse("optim.lr", "loguniform(1e-5, 1e-3)").args == (1e-5, 1e-3)
    assert parse("peft.r", "randint(4, 32)").args == (4, 32)
    assert parse("optim.scheduler", "choice(cosine, 'linear', null, true, -2)").args == ("cosine", "linear", None,
                                                                                       True, -2)
    assert parse("peft.target_modules", "grid([q_proj, v_proj], [q_proj])").args == (["q_proj", "v_proj"],
                                                                                    ["q_proj"])
    space = [parse("optim.lr", "grid(1e-3, 1e-2)"), parse("peft.r", "choice(8, 16, 32)")]
    assert grid_points(space) == [{"optim.lr": lr, "peft.r": r} for lr in (1e-3, 1e-2) for r in (8, 16, 32)]
    ranged = [parse("optim.lr", "loguniform(1e-5, 1e-3)"), parse("peft.r", "randint(4, 6)")]
    points = random_points(ranged, 200, seed=3)
    assert points == random_points(ranged, 200, seed=3) != random_points(ranged, 200, seed=4)
    assert all(1e-5 <= p["optim.lr"] <= 1e-3 for p in points)
    assert {p["peft.r"] for p in points} == {4, 5, 6}  # both ends included
    # Log-uniform: as many draws in each decade.
    low = sum(p["optim.lr"] < 1e-4 for p in points)
    assert 70 <= low <= 130


def test_points_reach_hydra_as_they_were_drawn():
    """The overrides the SLURM path hands each array task parse back, through Hydra's grammar, to the values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ftcluster.sweep.slurm_backend import hydra_value, minutes

    values = [3e-4, 1e-05, 16, True, None, "it's $HOME", ["q_proj", "v_proj"], "cosine"]
    parsed = OverridesParser.create().parse_overrides([f"k={hydra_value(v)}" for v in values])
    assert [o.value() for o in parsed] == values
    assert [minutes(t) for t in ("30", "90:30", "01:00:00", "2-00", "1-02:03:04")] == [30, 91, 60, 2880, 1564]


def test_train_takes_a_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   oops: [\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert f"{bad}:3: not valid YAML" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    assert main(["config", *TINY, f"output_dir={tmp_path / 'run'}"]) == 0
    good.write_text(capsys.readouterr().out)
    assert main(["config", "--config", str(good), "trainer.max_steps=3"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.trainer.max_steps == 3 and cfg.model.name == "tiny"
    assert main(["train", "--config", str(good), "model=smollm2"]) == 2
    assert "a complete config" in capsys.readouterr().err
    assert main(["train", "--config", str(good), "trainer.max_stepz=3"]) == 2
    assert "config key 'trainer.max_stepz'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rows_sort_by_the_metric_with_unmeasured_trials_last():
    from ftcluster.sweep.summary import best_row, sort_rows

    rows = [{"trial": t, "metric": m, "status": s} for t, m, s in
            (("a", 2.0, "completed"), ("b", math.nan, "completed"), ("c", 1.0, "stopped early at step 2"),
             ("d", None, "failed: x"), ("e", 1.5, "completed"))]
    assert [r["trial"] for r in sort_rows(rows, "eval_loss", "min")] == ["c", "e", "a", "b", "d"]
    assert [r["trial"] for r in sort_rows(rows, "eval_loss", "max")] == ["a", "e", "c", "b", "d"]
    assert best_row(sort_rows(rows, "eval_loss", "min"))["trial"] == "e"  # completed beats stopped early


def test_optuna_proposes_points_inside_the_space(base_cfg):
    """search=optuna: Ray Tune's OptunaSearch (TPE, seeded by `seed`) over the parsed space."""
    import copy

    from ftcluster.sweep.tune_backend import _tune_config

    cfg = copy.deepcopy(base_cfg)
    cfg.sweep.search, cfg.sweep.concurrency = "optuna", 2
    space = [parse("optim.lr", "loguniform(1e-5, 1e-3)"), parse("peft.r", "randint(4, 6)")]
    tune_config = _tune_config(cfg, trials=8)
    assert tune_config.max_concurrent_trials == 2 and tune_config.num_samples == 8
    searcher = tune_config.search_alg
    assert searcher.set_search_properties("eval_loss", "min", {p.key: p.tune_domain("optuna") for p in space})
    points = [searcher.suggest(f"t{i}") for i in range(6)]
    assert all(1e-5 <= p["optim.lr"] <= 1e-3 and p["peft.r"] in (4, 5, 6) for p in points)
    assert len({p["optim.lr"] for p in points}) == 6


def _sweep_plan(tmp_path, search="grid", **params):
    from ftcluster.config import compose
    from ftcluster.sweep.plan import make_plan

    trials = "null" if search == "grid" else "2"
    cfg = compose([*ONE_WORKER, f"sweep.search={search}", f"sweep.trials={trials}", "sweep.scheduler=none",
                   "trainer.max_steps=2",
                   "data.prepare_workers=1", f"data.prepared_dir={tmp_path / 'store'}",
                   f"output_dir={tmp_path / 'sweep'}"])
    with open_dict(cfg.sweep.params):
        cfg.sweep.params.update(params)
    return make_plan(cfg)


def test_a_sweep_prepares_each_distinct_data_set_once_before_its_trials(tmp_path, monkeypatch):
    """Swept keys that leave the data alone: one set for every trial; trainer.max_seq_len: one set per value.
    Each is tokenized once, and a trial's run over it then reuses it without tokenizing."""
    import ftcluster.data.shards as shards
    from ftcluster.data.prepare import prepare
    from ftcluster.sweep.data import prepare_before_trials
    from ftcluster.sweep.trial import trial_config
    from ftcluster.train.tokenizer import load_tokenizer

    encoded = []
    real = shards.encode_records
    monkeypatch.setattr(shards, "encode_records", lambda records, *a, **k: encoded.append(len(records)) or
                        real(records, *a, **k))
    said = []
    by_lr = prepare_before_trials(_sweep_plan(tmp_path, **{"optim.lr": "grid(1e-3, 3e-3)"}), log=said.append)
    assert len(by_lr) == 1 and not by_lr[0]["reused"]
    assert "its 2 trials train on 1 prepared data set (the swept optim.lr leaves the data unchanged)" in said[0]
    records = sum(by_lr[0][split]["records"] for split in ("train", "eval"))
    assert sum(encoded) == records  # every record tokenized once, for both trials

    # Each trial's run (as the driver prepares it) finds the set and tokenizes nothing.
    encoded.clear()
    plan = _sweep_plan(tmp_path, **{"optim.lr": "grid(1e-3, 3e-3)"})
    for lr in (1e-3, 3e-3):
        cfg = trial_config(plan.cfg, {"optim.lr": lr}, tmp_path / "sweep" / "trials" / str(lr), "g")
        said.clear()
        stats = prepare(cfg, load_tokenizer(cfg.model.path), str(tmp_path / str(lr) / "data"), log=said.append)
        assert stats["rows_digest"] == by_lr[0]["rows_digest"] and "reusing the prepared set" in said[0]
    assert encoded == []

    said.clear()
    by_length = prepare_before_trials(_sweep_plan(tmp_path, **{"trainer.max_seq_len": "grid(192, 256)",
                                                               "optim.lr": "grid(1e-3, 3e-3)"}), log=said.append)
    assert "its 4 trials train on 2 prepared data sets (trainer.max_seq_len shapes the data)" in said[0]
    assert [s["max_seq_len"] for s in by_length] == [192, 256]
    assert [s["reused"] for s in by_length] == [False, True]  # 256 is the set the optim.lr sweep prepared
    assert sum(encoded) == records  # only the 192-token set was tokenized
    assert len({s["dir"] for s in [*by_length, *by_lr]}) == 2

    # Values drawn as the sweep goes, of a key that shapes the data: the trials prepare (the store's lock
    # keeps two from preparing one set at once); of keys that do not: one set, prepared here.
    said.clear()
    drawn = _sweep_plan(tmp_path, "random", **{"trainer.max_seq_len": "choice(160, 224)"})
    assert prepare_before_trials(drawn, log=said.append) == [] and "each trial prepares its set" in said[0]
    drawn = _sweep_plan(tmp_path, "optuna", **{"optim.lr": "loguniform(1e-5, 1e-3)"})
    (reused,) = prepare_before_trials(drawn, log=said.append)
    assert reused["reused"] and reused["dir"] == by_lr[0]["dir"]


def test_trials_that_may_run_on_other_nodes_share_a_store_in_the_sweep_folder(tmp_path, monkeypatch):
    from ftcluster.sweep.slurm_backend import point_overrides
    from ftcluster.sweep.trial import trial_store

    monkeypatch.delenv("FTCLUSTER_CACHE", raising=False)
    cfg = _sweep_plan(tmp_path, **{"optim.lr": "grid(1e-3, 3e-3)"}).cfg
    assert trial_store(cfg) == str(tmp_path / "store")  # the user's
    cfg.data.prepared_dir = None
    assert trial_store(cfg) is None  # trials on this machine: the default store, shared with every run here
    cfg.sweep.backend = "slurm"
    assert trial_store(cfg) == str(tmp_path / "sweep" / "prepared")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(point_overrides({"optim.lr": 1e-3}, "point_000",
                                                                         tmp_path / "p", "g", trial_store(cfg)))
    assert {o.key_or_group: o.value() for o in overrides}["data.prepared_dir"] == str(tmp_path / "sweep" / "prepared")
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    assert trial_store(cfg) == str(tmp_path / "cache" / "prepared")


@pytest.mark.slow
def test_a_sweep_prepares_once_and_every_trial_says_it_reuses_the_set(tmp_path, capfd):
    store, out = tmp_path / "store", tmp_path / "sweep"
    assert main(["sweep", *ONE_WORKER, "sweep.params.optim.lr=grid(1e-3, 3e-3)", "sweep.search=grid",
                 "sweep.scheduler=none", "sweep.concurrency=2", "trainer.max_steps=2", f"data.prepared_dir={store}",
                 f"output_dir={out}"]) == 0
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert "its 2 trials train on 1 prepared data set" in log
    (prepared,) = [p for p in store.iterdir() if (p / "stats.json").is_file()]  # no trial prepared another
    trials = list((out / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert (trial / "data").resolve() == prepared.resolve()
    # Each trial's run logs it (Ray may fold the two identical lines into one "[repeated 2x ...]").
    assert "reusing the prepared set" in log
