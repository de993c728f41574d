"""What test modules share: the tiny-run overrides, the run helpers and the checks on a run's files.
Fixtures and the environment set-up live in conftest.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

# The tiny model on the bundled data, quiet, no generation: a few seconds per run.
TINY = ["model=tiny", "data=json_extract", "peft=none", "tracking=none", "trainer.eval_generate=false",
        "trainer.max_seq_len=256", "trainer.micro_batch_per_device=2", "trainer.global_batch=8",
        "trainer.eval_every_steps=0", "trainer.save_every_steps=0", "optim.lr=1e-3", "optim.warmup_steps=0",
        "optim.scheduler=linear", "launcher.workers=2"]

# One rank in this process (launcher=inline): for checks of one rank's numerics, in seconds, without Ray.
INLINE = ["launcher=inline", "launcher.workers=1"]

# A run long enough to interrupt (preemption, killed workers), checkpointing every 3 steps.
LONG_STEPS = 40
LONG = ["strategy=zero2", f"trainer.max_steps={LONG_STEPS}", "trainer.save_every_steps=3"]

# ZeRO-3 across an epoch boundary: 40-row global batches make an epoch of the bundled data (300 packed rows)
# 7.5 steps long, so 8 steps cross one, after the resume test's stop at step 5. Evaluation every 4 steps.
RESUMABLE = ["strategy=zero3", "trainer.max_steps=8", "trainer.global_batch=40", "trainer.micro_batch_per_device=10",
             "trainer.eval_every_steps=4"]

# The bundled preference pairs at the tiny model's scale.
PAIRS = ["data=json_extract_pairs", "trainer.micro_batch_per_device=2", "trainer.global_batch=8",
         "trainer.max_seq_len=192"]

PLAIN_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train(output_dir: Path, *overrides: str) -> Path:
    """`ftcluster train` in this process (one Ray cluster shared across tests, or launcher=inline with
    INLINE); returns final/'s path."""
    from ftcluster.config import compose
    from ftcluster.run.driver import train as driver_train

    args = [*TINY, *overrides, f"output_dir={output_dir}"]
    return driver_train(compose(args), ["train", *args])


# A line Ray's log monitor forwards to this process: "(raylet) ..." or "(SomeActor pid=123) ...", maybe coloured.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|[^)]*pid=\d+[^)]*)\)")


def own_stderr(capsys) -> str:
    """What a command run in this process wrote to stderr since the last read. Lines Ray forwards from a cluster
    an earlier test left running in this process (the tests share one, for speed) are not the command's: on a
    nearly full disk its raylet warns every 10 s."""
    return "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                   if not _RAY_FORWARDED.match(line))


def refused(capsys, *args: str) -> str:
    """The CLI run in this process on `args` must refuse them (exit 2) with one line on stderr and no traceback;
    returns that line."""
    from ftcluster.cli import main

    capsys.readouterr()  # what came before (progress bars of a dataset written by the test)
    assert main(list(args)) == 2
    err = own_stderr(capsys)
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no traceback
    return err


def losses(output_dir: Path) -> dict[int, float]:
    from ftcluster.observe.track import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def last_step(output_dir: Path) -> int:
    """For polling a running job: the last logged step (a line being written counts as not there yet)."""
    path = Path(output_dir) / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            break
    return max(steps)


@contextmanager
def ranks_held(output_dir: Path, timeout: float = 120):
    """The run's ranks (workers.json) stopped with SIGSTOP for the block, and continued after it once the driver
    has turned a stop signal sent inside the block into its request file. A tiny model's step takes 50 ms: unheld,
    a short run can reach its last step before the request reaches the ranks (it did on a fast CI machine); held,
    they stop at their next step boundary whatever the machine's speed."""
    from ftcluster.train.stop import request_file

    pids = [w["pid"] for w in json.loads((Path(output_dir) / "workers.json").read_text())]
    for pid in pids:
        with suppress(ProcessLookupError):  # (a rank of an attempt that has ended)
            os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
        request = request_file(output_dir)
        deadline = time.time() + timeout
        while not request.exists():
            assert time.time() < deadline, f"the driver wrote no {request} within {timeout:.0f} s of the signal"
            time.sleep(0.05)
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def assert_same_weights(a: Path, b: Path) -> None:
    """Two final/ folders hold bit-identical weights."""
    from safetensors.torch import load_file

    left, right = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].equal(right[name]), name


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process."""
    # This interpreter's folder first on PATH: jobs it submits (SLURM, Ray) run `python` from there too.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PATH": path, **(env or {})})


def as_rows(dataset, location: str = "rows built by the test"):
    """A datasets.Dataset a test built, as the PreparedRows the loader reads from a prepared split."""
    from ftcluster.data.rows import PreparedRows

    return PreparedRows(dataset.with_format("arrow")[:], location)
