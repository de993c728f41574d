"""What test modules share: the tiny-run overrides, the run helpers and the checks on a run's files.
Fixtures and the environment set-up live in conftest.py."""

import json
import os
import subprocess
import sys
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

# ZeRO-3 across an epoch boundary: 16-row global batches make an epoch a few steps long, so 8 steps cross
# at least one. Evaluation every 4 steps.
RESUMABLE = ["strategy=zero3", "trainer.max_steps=8", "trainer.global_batch=16", "trainer.micro_batch_per_device=4",
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
