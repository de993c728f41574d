"""launcher=inline: the entry runs in this process as rank 0 of 1, the environment is as it was afterwards,
every inline run of the process sees the same world, and errors come out as the entry raised them. (Real
runs on it: test_train_variants.py, test_eval.py, test_preference.py.)"""

import os

import pytest
from omegaconf import OmegaConf

from ftcluster.errors import UserError
from ftcluster.launch import inline, launcher_for

CFG = OmegaConf.create({"launcher": {"name": "inline", "workers": 1}})
WORLD = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_the_entry_runs_here_as_rank_0_of_1_and_the_environment_is_restored(monkeypatch):
    monkeypatch.setenv("RANK", "5")  # e.g. `ftcluster train launcher=inline` inside a torchrun job
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = dict(os.environ)
    seen = []

    def entry(payload):
        seen.append((payload, os.getpid(), {k: os.environ[k] for k in WORLD}))
        os.environ["SET_BY_THE_ENTRY"] = "1"

    assert launcher_for("inline") is inline
    inline.launch(entry, {"x": 1}, CFG)
    inline.launch(entry, {"x": 2}, CFG)
    assert dict(os.environ) == before
    (first, pid, world), (second, _, again) = seen
    assert (first, second, pid) == ({"x": 1}, {"x": 2}, os.getpid())
    assert {k: world[k] for k in WORLD[:5]} == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    # The process group of one built by the first run stays for the process: later runs present its world.
    assert again == world and int(world["MASTER_PORT"]) > 0


def test_errors_propagate_as_raised_and_the_environment_is_restored():
    before = dict(os.environ)

    def entry(payload):
        raise UserError("data.path: no such file")

    with pytest.raises(UserError, match="^data.path: no such file$"):
        inline.launch(entry, {}, CFG)
    assert dict(os.environ) == before


def test_more_than_one_worker_and_controllers_are_refused():
    with pytest.raises(UserError, match="launcher.workers"):
        inline.launch(print, {}, OmegaConf.create({"launcher": {"name": "inline", "workers": 2}}))
    with pytest.raises(UserError, match="Ray actors: use launcher=local"):
        inline.control(print, {}, CFG)
