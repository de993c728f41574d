"""Secrets never reach a file, a log or a dashboard: masked (***) in config.yaml, manifest.json and the wandb
config; refused, naming the key, where a job would carry them (the sbatch script, a Ray Job's entrypoint and
runtime_env); a Ray Job's working_dir never ships credentials. And every Ray cluster ftcluster starts uses
Ray's token authentication: a client without the token is refused (the slow tests at the end)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import INLINE, TINY, train
from ftcluster.cli import main
from ftcluster.util.net import free_port
from ftcluster.util.secrets import MASK, find_secrets, is_secret_name, redact, redact_args, redact_text

ROOT = Path(__file__).resolve().parent.parent
# Shaped like real tokens (made up): each must be masked wherever it goes.
HF = "hf_" + "a1B2c3D4e5" * 4
GITHUB = "ghp_" + "Z9y8X7w6V5" * 4
OPENAI = "sk-" + "proj0123456789abcdefXYZ"
AWS = "AKIA" + "ABCDEFGHIJKLMNOP"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PLAIN = "s3cr3t-value-w1thout-a-shape"  # a secret only by the name that holds it


# ==== Names and shapes ===================================================================================

@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "hf_token", "apiKey", "dbPassword", "DB_PASSWD",
                                  "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "AUTHORIZATION",
                                  "RAY_AUTH_TOKEN", "launcher.runtime_env.env_vars.HF_TOKEN", "HUGGINGFACEHUB_API_TOKEN",
                                  "client_secret", "private-key"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "max_new_tokens", "num_virtual_tokens", "author",
                                  "keyboard", "monkey", "WANDB_MODE", "output_dir", "PWD", "HF_HUB_OFFLINE"])
def test_names_that_are_not_secrets(name):
    assert not is_secret_name(name)


@pytest.mark.parametrize("token", [HF, GITHUB, OPENAI, AWS, JWT, "xoxb-1234567890-abcdefghij"])
def test_token_shapes_are_masked_anywhere_in_text(token):
    assert redact_text(f"prefix {token} suffix") == f"prefix {MASK} suffix"


def test_named_values_in_text_keep_their_name():
    assert redact_text("Authorization: Bearer abcdefghijklmnop0123") == f"Authorization: Bearer {MASK}"
    assert redact_text(f"api_key={PLAIN} password: hunter2hunter") == f"api_key={MASK} password: {MASK}"
    assert redact_text("nothing to see: 1.2.3.4, max_new_tokens=32") == "nothing to see: 1.2.3.4, max_new_tokens=32"


def test_nested_config_is_masked_by_name_and_by_shape():
    config = {"launcher": {"runtime_env": {"env_vars": {"HF_TOKEN": PLAIN, "SEED": "7", "EMPTY_TOKEN": ""},
                                           "pip": [f"https://x/{GITHUB}/pkg.whl", "rich"]}},
              "credentials": {"user": "me", "port": 1234, "nested": [PLAIN], "enabled": True},
              "data": {"system_prompt": f"use {OPENAI} please"}, "trainer": {"max_new_tokens": 32}}
    masked = redact(config)
    assert masked["launcher"]["runtime_env"]["env_vars"] == {"HF_TOKEN": MASK, "SEED": "7", "EMPTY_TOKEN": ""}
    assert masked["launcher"]["runtime_env"]["pip"] == [f"https://x/{MASK}/pkg.whl", "rich"]
    # Everything under a secret-looking key, except what holds no secret (booleans: config.yaml still loads).
    assert masked["credentials"] == {"user": MASK, "port": MASK, "nested": [MASK], "enabled": True}
    assert masked["data"]["system_prompt"] == f"use {MASK} please" and masked["trainer"]["max_new_tokens"] == 32
    assert config["launcher"]["runtime_env"]["env_vars"]["HF_TOKEN"] == PLAIN  # a copy; the run keeps the value
    assert sorted(find_secrets(config)) == ["credentials", "data.system_prompt", "launcher.runtime_env.env_vars.HF_TOKEN",
                                            "launcher.runtime_env.pip[0]"]


def test_command_lines_are_masked():
    args = ["train", "model=tiny", f"+launcher.runtime_env.env_vars.HF_TOKEN={PLAIN}", f"++db.password='{PLAIN}'",
            "--token", PLAIN, f"--api-key={PLAIN}", f"data.system_prompt='say {HF}'", "tokenizer=x",
            "+launcher.runtime_env.env_vars.HF_TOKEN=null"]
    assert redact_args(args) == ["train", "model=tiny", f"+launcher.runtime_env.env_vars.HF_TOKEN={MASK}",
                                 f"++db.password={MASK}", "--token", MASK, f"--api-key={MASK}",
                                 f"data.system_prompt='say {MASK}'", "tokenizer=x",
                                 "+launcher.runtime_env.env_vars.HF_TOKEN=null"]


def test_data_scrub_uses_the_same_detectors():
    from ftcluster.data.tools import scrub
    from ftcluster.util.secrets import SECRET_PATTERNS

    assert scrub._PATTERNS[:len(SECRET_PATTERNS)] == SECRET_PATTERNS
    assert scrub.scrub_text(f"key {HF} mail a@b.org")[0] == "key [HF_TOKEN] mail [EMAIL]"


# ==== A run's files ======================================================================================

def _files_holding(folder: Path, *needles: str) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {needle[:6]}..." for needle in needles if needle.encode() in data]
    return found


def test_a_run_writes_no_secret_to_any_file(tmp_path):
    """config.yaml, manifest.json (its command line), the wandb run (offline): masked, yet config.yaml loads."""
    out = tmp_path / "run"
    overrides = [*INLINE, "trainer.max_steps=2", "tracking=wandb", f"+launcher.runtime_env.env_vars.HF_TOKEN={PLAIN}",
                 f"+launcher.runtime_env.env_vars.NOTE=pass {GITHUB} on"]
    train(out, *overrides)
    assert not _files_holding(out, PLAIN, GITHUB)
    from ftcluster.config import load_run_config

    env_vars = load_run_config(out / "config.yaml").launcher.runtime_env.env_vars
    assert env_vars.HF_TOKEN == MASK and env_vars.NOTE == f"pass {MASK} on"
    command = json.loads((out / "manifest.json").read_text())["command"]
    assert f"+launcher.runtime_env.env_vars.HF_TOKEN={MASK}" in command and "trainer.max_steps=2" in command
    wandb_run = next((out / "wandb").rglob("run-*.wandb")).read_bytes()  # the offline run, config included
    assert b'"HF_TOKEN":"***"' in wandb_run


# ==== Submitted jobs: refused, naming the key; the environment is the way in ===============================

RAY = ["launcher=ray", "launcher.address=http://127.0.0.1:8265"]


@pytest.mark.parametrize("launcher", [["launcher=slurm"], RAY], ids=["slurm", "ray"])
@pytest.mark.parametrize("override, key", [
    (f"+launcher.runtime_env.env_vars.HF_TOKEN={PLAIN}", "launcher.runtime_env.env_vars.HF_TOKEN"),
    (f"launcher.setup=['export HF_TOKEN={HF}']", "launcher.setup[0]"),
    (f"data.system_prompt='Bearer {JWT}'", "data.system_prompt"),
])
def test_dry_run_refuses_a_secret_naming_its_key(tmp_path, capsys, monkeypatch, launcher, override, key):
    monkeypatch.chdir(tmp_path)
    code = main(["train", *TINY, *launcher, override, f"output_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr()
    assert code == 2, out.out + out.err
    assert f"config key '{key}'" in out.err and "environment" in out.err, out.err
    for secret in (PLAIN, HF, JWT):
        assert secret not in out.out + out.err
    assert not (tmp_path / "run").exists()


def test_sbatch_dry_run_passes_secrets_through_the_environment_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", PLAIN)
    assert main(["train", *TINY, "launcher=slurm", f"output_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert HF not in script and PLAIN not in script
    assert "#SBATCH --export=ALL" in script  # sbatch hands the submitting environment (and HF_TOKEN) to the job
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN" in script and "disabled" not in script


def test_ray_job_dry_run_forwards_no_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in [("HF_TOKEN", HF), ("WANDB_API_KEY", PLAIN), ("WANDB_MODE", "offline")]:
        monkeypatch.setenv(name, value)
    assert main(["train", *TINY, *RAY, f"output_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert HF not in out and PLAIN not in out
    runtime_env = json.loads(out.split("runtime_env: ", 1)[1])
    assert runtime_env["env_vars"]["WANDB_MODE"] == "offline"
    assert not [name for name in runtime_env["env_vars"] if is_secret_name(name)]


@pytest.mark.parametrize("holds", [".netrc", ".ssh/id_ed25519", ".cache/huggingface/token", "token",
                                   "sub/.aws/credentials", ".git-credentials", ".ray/auth_token"])
def test_ray_job_refuses_a_working_dir_with_credentials(tmp_path, capsys, monkeypatch, holds):
    workdir = tmp_path / "project"
    (workdir / holds).parent.mkdir(parents=True, exist_ok=True)
    (workdir / holds).write_text("x")
    code = main(["train", *TINY, *RAY, f"launcher.working_dir={workdir}", f"output_dir={tmp_path / 'run'}",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config key 'launcher.working_dir'" in err and str(workdir / holds.split("/")[0]) in err, err


def test_ray_job_refuses_the_home_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code = main(["train", *TINY, *RAY, f"output_dir={tmp_path / 'run'}", "--dry-run"])  # working_dir=. is home
    err = capsys.readouterr().err
    assert code == 2 and "config key 'launcher.working_dir'" in err and "home folder" in err, err


# ==== Ray's token authentication on every cluster ftcluster starts (slow) ===================================

def _get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_launcher_local_cluster_refuses_a_client_without_the_token():
    import ray

    from ftcluster.launch.cluster import connect, release_cluster, token_file

    # The in-process cluster of launcher=local with launcher.dashboard=true (the default runs none at all);
    # another test's cluster, without it, goes first.
    release_cluster()
    connect(None, dashboard=True)
    url = "http://" + ray._private.worker.global_worker.node.webui_url + "/api/jobs/"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    path = token_file()
    assert path.stat().st_mode & 0o777 == 0o600
    assert _get(url) == 401
    assert _get(url, "0" * 64) == 403
    assert _get(url, path.read_text().strip()) == 200


@pytest.mark.slow
def test_launch_scripts_cluster_refuses_a_client_without_the_token(tmp_path):
    """start_head.sh makes ~/.ray/auth_token (0600) when missing and turns token auth on; `ftcluster jobs`
    and join_worker.sh on this machine find the token; a machine without it is refused."""
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    port, dash = free_port(), free_port()
    temp_dir = f"/tmp/ftc-sec-{os.getpid()}-{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), FTCLUSTER_RAY_DIR=str(state), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    started = subprocess.run([ROOT / "launch/start_head.sh", "--port", str(port), "--dashboard-port", str(dash),
                              "--num-cpus=1", f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                              f"--ray-client-server-port={free_port()}"], capture_output=True, text=True, env=env,
                             timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        token_path = home / ".ray" / "auth_token"
        assert token_path.stat().st_mode & 0o777 == 0o600 and f"token: {token_path}" in " ".join(started.stdout.split())
        token = token_path.read_text().strip()
        assert token not in started.stdout + started.stderr
        url = f"http://127.0.0.1:{dash}/api/jobs/"
        assert _get(url) == 401 and _get(url, "0" * 64) == 403 and _get(url, token) == 200

        jobs = [sys.executable, "-m", "ftcluster.cli", "jobs", "list", "--address", f"http://127.0.0.1:{dash}"]
        listed = subprocess.run(jobs, capture_output=True, text=True, env=env, timeout=120)
        assert listed.returncode == 0 and "no jobs" in listed.stdout, listed.stderr
        refused = subprocess.run(jobs, capture_output=True, text=True, env={**env, "RAY_AUTH_TOKEN": "0" * 64},
                                 timeout=120)
        assert refused.returncode == 2 and "token" in refused.stderr and "RAY_AUTH_TOKEN_PATH" in refused.stderr, \
            refused.stderr[-3000:]

        elsewhere = {**env, "HOME": str(tmp_path)}  # another machine: no token file
        joined = subprocess.run([ROOT / "launch/join_worker.sh", f"127.0.0.1:{port}"], capture_output=True, text=True,
                                env=elsewhere, timeout=60)
        assert joined.returncode == 1 and "no Ray token" in joined.stderr and "RAY_AUTH_TOKEN_PATH" in joined.stderr
    finally:
        stopped = subprocess.run([ROOT / "launch/stop.sh"], capture_output=True, text=True, env=env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.mark.slow
def test_slurm_job_cluster_refuses_a_client_without_the_token(slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_TOKEN": HF,
           "FTCLUSTER_RAY_DIR": str(tmp_path / "state")}
    submitted = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={log}",
                                ROOT / "slurm/ftcluster.sbatch", *TINY, "launcher=slurm", "trainer.max_steps=2000",
                                f"output_dir={run}"], capture_output=True, text=True, check=True, cwd=tmp_path, env=env)
    job = submitted.stdout.strip()
    try:
        _wait(lambda: log.is_file() and "Ray dashboard" in log.read_text(), "the job to start its Ray head")
        found = re.search(r"Ray dashboard (http://127\.0\.0\.1:\d+) .* RAY_AUTH_TOKEN_PATH=(\S+)", log.read_text())
        url, token_path = found.group(1) + "/api/jobs/", Path(found.group(2))
        assert token_path.parent == tmp_path / "state" and token_path.stat().st_mode & 0o777 == 0o600
        token = token_path.read_text().strip()

        def answers() -> bool:
            try:
                return _get(url) in (401, 403, 200)
            except OSError:
                return False

        _wait(answers, "the job's dashboard")
        assert _get(url) == 401 and _get(url, "0" * 64) == 403 and _get(url, token) == 200
        _wait(lambda: (run / "metrics.jsonl").is_file(), "the job to train", 400)  # its driver joined with the token
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    _wait(lambda: not token_path.exists(), "the job to remove its token file", 90)
    text = log.read_text()
    assert token not in text and HF not in text
    assert not _files_holding(run, HF, token)


# ==== Credentials inside URLs ============================================================================

@pytest.mark.parametrize("url, masked", [
    (f"https://alice:{PLAIN}@hub.example.org/data.jsonl", f"https://alice:{MASK}@hub.example.org/data.jsonl"),
    (f"redis://:{PLAIN}@cache.local:6379/0", f"redis://:{MASK}@cache.local:6379/0"),
    ("postgresql://bob:s3cr%40t@db.local:5432/app", f"postgresql://bob:{MASK}@db.local:5432/app"),
])
def test_a_password_in_a_url_is_masked_keeping_the_host(url, masked):
    assert redact_text(f"fetch {url} now") == f"fetch {masked} now"
    config = {"data": {"path": url}, "launcher": {"runtime_env": {"env_vars": {"DATA_URL": url}}}}
    assert redact(config) == {"data": {"path": masked}, "launcher": {"runtime_env": {"env_vars": {"DATA_URL": masked}}}}
    assert sorted(find_secrets(config)) == ["data.path", "launcher.runtime_env.env_vars.DATA_URL"]


@pytest.mark.parametrize("text", ["https://alice@hub.example.org/x", "http://host:8080/path@v2",
                                  "git@github.com:o/r.git", "s3://bucket/key:with:colons"])
def test_urls_without_a_password_are_left_alone(text):
    assert redact_text(text) == text and not find_secrets({"path": text})


def test_config_shows_a_url_password_masked(tmp_path, capsys):
    url = f"https://alice:{PLAIN}@hub.example.org/data"
    assert main(["config", *TINY, f"+launcher.runtime_env.env_vars.DATA_URL={url}", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert PLAIN not in out and f"DATA_URL: https://alice:{MASK}@hub.example.org/data" in out


@pytest.mark.parametrize("launcher", [["launcher=slurm"], RAY], ids=["slurm", "ray"])
def test_a_submission_carrying_a_url_password_is_refused_naming_the_key(tmp_path, capsys, monkeypatch, launcher):
    monkeypatch.chdir(tmp_path)
    url = f"redis://:{PLAIN}@cache.local:6379/0"
    code = main(["train", *TINY, *launcher, f"+launcher.runtime_env.env_vars.CACHE_URL='{url}'",
                 f"output_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr()
    assert code == 2, out.out + out.err
    assert "config key 'launcher.runtime_env.env_vars.CACHE_URL'" in out.err and "environment" in out.err, out.err
    assert PLAIN not in out.out + out.err
    assert not (tmp_path / "run").exists()


# ==== A sweep's best.yaml ================================================================================

def test_best_yaml_leaves_secrets_out_and_names_them(tmp_path, capsys):
    """The best trial's config.yaml holds *** where secrets were; best.yaml leaves those keys out (a *** kept
    would be sent as the token itself), says which, and still composes as `ftcluster train --config` does."""
    from ftcluster.config import compose, to_yaml
    from ftcluster.sweep.summary import write_best

    trial = tmp_path / "sweep" / "trials" / "trial_0"
    trial.mkdir(parents=True)
    url = f"https://alice:{PLAIN}@hub.example.org/x"
    cfg = compose([*TINY, f"+launcher.runtime_env.env_vars.HF_TOKEN={PLAIN}", "+launcher.runtime_env.env_vars.SEED=7",
                   f"+launcher.runtime_env.env_vars.MIRROR='{url}'", f"launcher.setup=['export HF_TOKEN={HF}', 'ls']",
                   f"output_dir={trial}"])
    (trial / "config.yaml").write_text(to_yaml(cfg))  # as the trial's run wrote it: masked
    assert MASK in (trial / "config.yaml").read_text()
    best = tmp_path / "sweep" / "best.yaml"
    write_best(best, tmp_path / "sweep", {"trial": "trial_0", "output_dir": str(trial), "metric": 0.5, "step": 2,
                                          "status": "completed", "params": {"optim.lr": 1e-3}}, "eval_loss")
    text = best.read_text()
    assert MASK not in text and PLAIN not in text and HF not in text
    note = next(line for line in text.splitlines() if line.startswith("# Left out"))
    for key in ("launcher.runtime_env.env_vars.HF_TOKEN", "launcher.runtime_env.env_vars.MIRROR", "launcher.setup[0]"):
        assert key in note, note
    assert main(["config", "--config", str(best)]) == 0
    composed = capsys.readouterr().out
    assert "SEED: 7" in composed and "HF_TOKEN" not in composed and "MIRROR" not in composed
    assert "- ls" in composed
