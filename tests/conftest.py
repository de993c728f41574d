import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tiny model on the bundled data, quiet, no generation: a few seconds per run.
TINY = ["model=tiny", "data=json_extract", "peft=none", "tracking=none", "trainer.eval_generate=false",
        "trainer.max_seq_len=256", "trainer.micro_batch_per_device=2", "trainer.global_batch=8",
        "trainer.eval_every_steps=0", "trainer.save_every_steps=0", "optim.lr=1e-3", "optim.warmup_steps=0",
        "optim.scheduler=linear", "launcher.workers=2"]


# A run long enough to interrupt (preemption, killed workers), checkpointing every 3 steps.
LONG_STEPS = 40
LONG = ["strategy=zero2", f"trainer.max_steps={LONG_STEPS}", "trainer.save_every_steps=3"]


def train(output_dir: Path, *overrides: str):
    """`ftcluster train` in this process (sharing one Ray cluster across tests); returns final/'s path."""
    from ftcluster.config import compose
    from ftcluster.run.driver import train as driver_train

    args = [*TINY, *overrides, f"output_dir={output_dir}"]
    return driver_train(compose(args), ["train", *args])


def train_in_process(output_dir: Path, *overrides: str) -> None:
    """The driver's preparation, then the worker entry called right here as a world of one, without Ray:
    for checks of one rank's numerics, in seconds (the libraries are already imported). The environment
    it sets is restored afterwards; its process group of one stays for the session, since DeepSpeed keeps
    the groups it built on it (a destroyed torch group cannot be swapped in under them)."""
    from ftcluster.config import compose
    from ftcluster.run.driver import prepare_run
    from ftcluster.train.worker import train_worker

    args = [*TINY, "launcher.workers=1", *overrides, f"output_dir={output_dir}"]
    payload = prepare_run(compose(args), ["train", *args])
    environment = dict(os.environ)
    os.environ.update(_WORLD_OF_ONE)  # what ftcluster.util.dist.setup set up the first time
    try:
        train_worker(payload)
        _WORLD_OF_ONE.update({k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                         "MASTER_PORT")})
    finally:
        os.environ.clear()
        os.environ.update(environment)


_WORLD_OF_ONE: dict[str, str] = {}


def losses(output_dir: Path) -> dict[int, float]:
    from ftcluster.observe.track import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def last_step(output_dir: Path) -> int:
    """For polling a running job: the last logged step (a line being written counts as not there yet)."""
    import json

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


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The LONG run without interruption: what every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, *LONG)
    return out


# ZeRO-3 across an epoch boundary: 16-row global batches make an epoch a few steps long, so 8 steps cross
# at least one. Evaluation every 4 steps.
RESUMABLE = ["strategy=zero3", "trainer.max_steps=8", "trainer.global_batch=16", "trainer.micro_batch_per_device=4",
             "trainer.eval_every_steps=4"]


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory) -> Path:
    """One uninterrupted RESUMABLE run: what the resumed run must reproduce, and the ZeRO-3 case of the
    equivalence with the single-process reference."""
    out = tmp_path_factory.mktemp("zero3") / "whole"
    train(out, *RESUMABLE)
    return out


PLAIN_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory) -> tuple[Path, Path]:
    """One ZeRO-2 SFT run that several tests read (equivalence with the reference loop, manifest and
    trackers, the export round trip): ChatML without the default system prompt as data.chat_template,
    wandb (offline) and TensorBoard on. Returns (output_dir, template file)."""
    root = tmp_path_factory.mktemp("zero2")
    template = root / "plain_chatml.jinja"
    template.write_text(PLAIN_CHATML)
    train(root / "run", "strategy=zero2", "trainer.max_steps=6", f"data.chat_template={template}", "tracking=wandb",
          "tracking.tensorboard=true")
    return root / "run", template


# The bundled preference pairs at the tiny model's scale.
PAIRS = ["data=json_extract_pairs", "trainer.micro_batch_per_device=2", "trainer.global_batch=8",
         "trainer.max_seq_len=192"]


@pytest.fixture(scope="session")
def reward_model_run(tmp_path_factory) -> Path:
    """A reward model trained on the bundled pairs (stage=rm, ZeRO-2, 2 workers): tested in
    test_preference.py, and the reward model of the PPO test."""
    out = tmp_path_factory.mktemp("reward_model")
    train(out, "stage=rm", *PAIRS, "strategy=zero2", "trainer.max_steps=12", "trainer.eval_every_steps=12",
          "optim.lr=3e-3")
    return out


@pytest.fixture(scope="module")
def slurm():
    """The local SLURM cluster (slurm/local/up.sh, root): brought up (and torn down) here unless one is already
    running."""
    root = Path(__file__).resolve().parent.parent
    running = shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    if not running:
        if os.geteuid() != 0:
            pytest.skip("the SLURM tests bring up a local cluster with slurm/local/up.sh, which needs root")
        subprocess.run([root / "slurm/local/up.sh"], check=True, timeout=900)
    yield
    if not running:
        subprocess.run([root / "slurm/local/down.sh"], check=True, timeout=120)


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
