"""launcher=slurm, the submitting side: render slurm/ftcluster.sbatch, check it against the cluster,
submit it, then follow the job's state and log and exit with its result.

Everything that can be refused is refused here, before the job waits in a queue: the config, values
that cannot go on an #SBATCH line, a partition that does not exist, more nodes, CPUs or GPUs than the
partition has. Nothing about devices is checked here (a login node has no GPU): CUDA, flash-attn and
strategy.precision=auto are checked and resolved by the job's own validate(), inside the allocation. The overrides are shell-quoted into the script, so they reach the job byte for byte.
Inside the allocation the same `ftcluster train` runs with FTCLUSTER_RAY_ADDRESS set, and
ftcluster.launch.slurm places the workers.

Secrets never go into the script (a file in output_dir, kept by slurmctld, shown by `scontrol write
batch_script`): a config holding one (a secret-looking key, a token-shaped value) is refused, naming the key.
The job gets secrets through its environment: sbatch passes the submitting shell's environment on
(--export=ALL), so `export HF_TOKEN=...` before `ftcluster train launcher=slurm` is the way.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from ftcluster.errors import ConfigError, UserError
from ftcluster.launch.submit import refuse_secrets, remote_overrides
from ftcluster.util.outputs import is_run, mark_folder
from ftcluster.util.text import tail

TEMPLATE = "ftcluster.sbatch"
# Job states after which nothing more happens (a requeued job goes back to PENDING instead).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT"}
POLL_S = 1.0
# Values that go on an #SBATCH line: sbatch splits those lines itself, so no spaces, quotes or newlines.
_DIRECTIVE_VALUE = re.compile(r"^[^\s'\"\\]+$")


def submits(cfg: DictConfig) -> bool:
    """Outside an allocation this process submits; inside, the template has set FTCLUSTER_RAY_ADDRESS."""
    return "FTCLUSTER_RAY_ADDRESS" not in os.environ


def submit(cfg: DictConfig, overrides: list[str], dry_run: bool = False) -> int:
    refuse_secrets(cfg, "which would be written into the batch script", "Give it to the job through its environment "
                   "instead: `export {name}=...` in the shell you submit from (sbatch passes that environment to the job)")
    script = render(cfg, remote_overrides(cfg, overrides))
    if dry_run:
        print(script, end="")
        return 0
    _require_tools()
    check_against_cluster(cfg.launcher)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Marked as a run before the script and the job's log land in it, so that they do not make the folder look
    # like the user's own files to the job's `ftcluster train` (the driver checked it was new, empty or a run).
    if not is_run(out):
        mark_folder(out, "train", names=[])
    path = out / "ftcluster.sbatch"
    path.write_text(script)
    job_id = _sbatch(path)
    log = out / f"slurm-{job_id}.log"
    print(f"[ftcluster] submitted SLURM job {job_id}; log {log}; cancel with: scancel {job_id}", flush=True)
    try:
        return follow(job_id, log)
    except KeyboardInterrupt:
        print(f"\n[ftcluster] stopped following; SLURM job {job_id} keeps running (scancel {job_id} stops it)",
              file=sys.stderr)
        return 130


def render(cfg: DictConfig, overrides: list[str]) -> str:
    """The template with the #SBATCH lines, setup lines and overrides of this config filled in."""
    template = resources.files("ftcluster.slurm").joinpath(TEMPLATE).read_text()
    lines = []
    for line in template.splitlines():
        if line.startswith("#SBATCH"):
            continue  # the template's defaults, replaced by the directives below
        if line == "#@ftcluster-directives":
            lines += [f"#SBATCH {d}" for d in directives(cfg)]
        elif line == "#@ftcluster-setup":
            lines += setup_lines(cfg.launcher)
        elif line == "#@ftcluster-overrides":
            lines.append("set -- " + " ".join(shlex.quote(o) for o in overrides))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def directives(cfg: DictConfig) -> list[str]:
    launcher = cfg.launcher
    per_node = launcher.workers // launcher.nodes
    cpus = launcher.cpus_per_task or per_node * launcher.cpus_per_worker
    options = {"--job-name": launcher.job_name, "--nodes": launcher.nodes, "--ntasks-per-node": 1,
               "--cpus-per-task": cpus, "--gpus-per-node": launcher.gpus_per_node or None,
               # 0: all of the node's memory; without it SLURM grants its default (often per CPU), and ZeRO 0-2
               # ranks each load the whole model into host memory at start.
               "--mem": launcher.mem,
               "--partition": launcher.partition, "--time": launcher.time, "--account": launcher.account,
               "--qos": launcher.qos, "--constraint": launcher.constraint,
               "--output": f"{cfg.output_dir}/slurm-%j.log", "--open-mode": "append",
               # The job's secrets (HF_TOKEN, WANDB_API_KEY) come from the submitting environment, never the script.
               "--export": "ALL",
               "--signal": f"B:USR1@{launcher.signal_before_end_s}" if launcher.signal_before_end_s else None}
    # The config key behind each free-text value, for the error message.
    keys = {"--job-name": "launcher.job_name", "--partition": "launcher.partition", "--time": "launcher.time",
            "--account": "launcher.account", "--qos": "launcher.qos", "--constraint": "launcher.constraint",
            "--output": "output_dir", "--mem": "launcher.mem"}
    lines = []
    for option, value in options.items():
        if value is None:
            continue
        if option in keys and not _DIRECTIVE_VALUE.match(str(value)):
            raise ConfigError(keys[option], f"{value!r} cannot go on an #SBATCH line (no spaces, quotes, "
                                            f"backslashes or newlines)")
        lines.append(f"{option}={value}")
    lines.append("--requeue" if launcher.requeue else "--no-requeue")
    if launcher.exclusive:
        lines.append("--exclusive")
    for extra in launcher.sbatch_args:
        if not extra.startswith("-") or any(c in extra for c in "\n\r\0"):
            raise ConfigError("launcher.sbatch_args", f"{extra!r} is not one sbatch option (e.g. --mail-type=END)")
        lines.append(extra)
    return lines


def setup_lines(launcher: DictConfig) -> list[str]:
    lines = [f"READY_TIMEOUT_S={launcher.ready_timeout_s}", f"REQUEUE={int(launcher.requeue)}"]
    if launcher.container_image:
        image = shlex.quote(launcher.container_image)
        mounts = ",".join(launcher.container_mounts)
        if launcher.container_runtime == "pyxis":
            lines.append(f"SRUN_CONTAINER=(--container-image={image}"
                         + (f" --container-mounts={shlex.quote(mounts)}" if mounts else "") + ")")
        else:
            binds = " ".join(f"--bind {shlex.quote(m)}" for m in launcher.container_mounts)
            lines.append(f"EXEC=(apptainer exec --nv {binds} {image})".replace("  ", " "))
    for line in launcher.setup:
        if "\0" in line:
            raise ConfigError("launcher.setup", "a setup line cannot contain a NUL character")
        lines.append(line)
    return lines


def _require_tools() -> None:
    missing = [tool for tool in ("sbatch", "squeue", "scontrol", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"launcher=slurm needs the SLURM client tools on PATH; missing: {', '.join(missing)}. Run "
                        f"from a login node, or bring up a local cluster with slurm/local/up.sh (root)")


def check_against_cluster(launcher: DictConfig) -> None:
    """Partition, node count, CPUs and GPUs per node, from sinfo: refused now instead of pending forever."""
    partitions = _partitions()
    name = launcher.partition or next((p for p, info in partitions.items() if info["default"]), None)
    if name not in partitions:
        key = "launcher.partition"
        raise ConfigError(key, f"SLURM has no partition {name!r}; available: {', '.join(sorted(partitions))}")
    info = partitions[name]
    if launcher.nodes > info["nodes"]:
        raise ConfigError("launcher.nodes", f"{launcher.nodes} nodes requested; partition {name} has {info['nodes']}")
    cpus = launcher.cpus_per_task or launcher.workers // launcher.nodes * launcher.cpus_per_worker
    if cpus > info["cpus"]:
        raise ConfigError("launcher.cpus_per_task", f"{cpus} CPUs per node requested; the nodes of partition {name} "
                                                    f"have at most {info['cpus']}")
    if launcher.gpus_per_node > info["gpus"]:
        raise ConfigError("launcher.gpus_per_node", f"{launcher.gpus_per_node} GPUs per node requested; the nodes "
                                                    f"of partition {name} have at most {info['gpus']}")


def _partitions() -> dict[str, dict]:
    # %R partition, %D nodes, %c CPUs per node, %G generic resources (gpu:a100:4(S:0-1)), one line per
    # partition and node configuration.
    text = _run(["sinfo", "-h", "-o", "%P|%D|%c|%G"]).stdout
    found: dict[str, dict] = {}
    for line in text.splitlines():
        name, nodes, cpus, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = found.setdefault(name, {"nodes": 0, "cpus": 0, "gpus": 0, "default": default})
        entry["nodes"] += int(nodes)
        entry["cpus"] = max(entry["cpus"], int(cpus.rstrip("+")))
        gpus = re.search(r"gpu(?::[^:,(]+)?:(\d+)", gres)
        entry["gpus"] = max(entry["gpus"], int(gpus.group(1)) if gpus else 0)
    return found


def _sbatch(script: Path) -> str:
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"sbatch refused {script}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def follow(job_id: str, log: Path) -> int:
    """Print state changes and the log as it grows until the job ends; return its exit code."""
    state, offset, exit_code = None, 0, None
    while True:
        info = job_info(job_id)
        offset = _print_new(log, offset)
        if info is None:
            raise UserError(f"SLURM job {job_id} is no longer known to the controller (and there is no accounting "
                            f"to ask); its log: {log}")
        if info["JobState"] != state:
            state = info["JobState"]
            print(f"[ftcluster] SLURM job {job_id}: {state}" + (f" (restart {info['Restarts']})"
                                                                 if info.get("Restarts", "0") != "0" else ""),
                  flush=True)
        if state in TERMINAL:
            exit_code = int(info.get("ExitCode", "1:0").split(":")[0])
            break
        time.sleep(POLL_S)
    _print_new(log, offset)
    if state == "COMPLETED":
        return 0
    print(f"[ftcluster] SLURM job {job_id} ended {state} with exit code {exit_code}; last lines of {log}:\n"
          + _log_tail(log), file=sys.stderr)
    return exit_code or 1


def job_info(job_id: str) -> dict | None:
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return _sacct(job_id)
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return {"JobState": fields.get("JobState"), "ExitCode": fields.get("ExitCode", "0:0"),
            "Restarts": fields.get("Restarts", "0")}


def _sacct(job_id: str) -> dict | None:
    if shutil.which("sacct") is None:
        return None
    result = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"],
                            capture_output=True, text=True)
    line = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
    if not line:
        return None
    state, exit_code = line[0].split("|")
    return {"JobState": state.split()[0], "ExitCode": exit_code, "Restarts": "0"}


def _print_new(log: Path, offset: int) -> int:
    if not log.is_file():
        return offset
    with log.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


def _log_tail(log: Path, lines: int = 20) -> str:
    return tail(log.read_text(errors="replace"), lines) if log.is_file() else "(no log)"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result
