"""The rules both training loops follow after a step (ftcluster.train.schedule), and the small shared helpers
they and the launchers write and report through (atomic writes, traceback tails). No model, no processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ftcluster.train.schedule import StepSchedule
from ftcluster.util import atomic
from ftcluster.util.text import tail


def trainer(**overrides):
    base = dict(max_steps=6, log_every_steps=2, eval_every_steps=3, eval_generate=True, eval_generate_every_steps=4,
                save_every_steps=5, stop_after_steps=None)
    return SimpleNamespace(**{**base, **overrides})


def test_what_is_due_after_each_step():
    schedule = StepSchedule(trainer(), lambda step: False)
    due = [schedule.due(step) for step in range(1, 7)]
    assert [d.log for d in due] == [False, True, False, True, False, True]
    assert [d.evaluate for d in due] == [False, False, True, True, False, True]  # every 3, generation's 4, last
    assert [d.generate for d in due] == [False, False, False, True, False, True]
    assert [schedule.ending(step).save for step in range(1, 7)] == [False] * 4 + [True, True]
    assert not any(schedule.ending(step).stop for step in range(1, 7))


def test_evaluation_before_training_only_on_a_fresh_start():
    schedule = StepSchedule(trainer(), lambda step: False)
    fresh, resumed = schedule.before_training(0), schedule.before_training(4)
    assert (fresh.evaluate, fresh.generate, resumed.evaluate) == (True, True, False)
    # Without generation of its own (the RL controller), trainer.eval_generate adds no evaluations.
    rl = StepSchedule(trainer(), lambda step: False, generation=False)
    assert not rl.before_training(0).generate and not rl.due(4).evaluate and rl.due(3).evaluate


def test_stops_checkpoint_and_say_why():
    asked = []
    schedule = StepSchedule(trainer(stop_after_steps=2), lambda step: asked.append(step) or False)
    ending = schedule.ending(2)
    assert (ending.save, ending.stop) == (True, True)
    assert ending.message("/out") == ("stopped after step 2 as trainer.stop_after_steps asks; "
                                      "resume=auto continues from /out/checkpoints/step-2")
    assert ending.message("/out", say_why=False) == ("stopped after step 2; "
                                                     "resume=auto continues from /out/checkpoints/step-2")
    assert asked == [2]  # asked even when a planned stop decides anyway: for SPMD ranks it is a collective

    requested = StepSchedule(trainer(), lambda step: step == 4).ending(4)
    assert (requested.save, requested.stop) == (True, True)
    assert "as a stop was requested (SIGUSR1 or SIGTERM);" in requested.message("/out")
    # At the last step the run ends anyway: a checkpoint, but no early stop.
    last = StepSchedule(trainer(stop_after_steps=6), lambda step: True).ending(6)
    assert (last.save, last.stop) == (True, False)


def test_replacing_leaves_the_old_content_when_the_write_fails(tmp_path):
    target = tmp_path / "out"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    folder = tmp_path / "folder"
    for content in ("first", "second"):
        with atomic.replacing(folder) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (folder / "f").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out"]


def test_publishing_keeps_the_first_complete_copy(tmp_path):
    folder = tmp_path / "cache" / "key"
    for content in ("first", "second"):
        with atomic.publishing(folder) as tmp:
            (tmp / "table").write_text(content)
    assert (folder / "table").read_text() == "first"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"]


def test_tail_keeps_the_last_lines():
    assert tail("\n a\nb\nc\nd\n\n", 2) == "c\nd"
    assert tail("", 3) == ""
