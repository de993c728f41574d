"""Hardware profiles: conf/cluster/NAME.yaml (or any YAML file of the same keys), with `cluster.KEY=VALUE`
overrides. The CPU profile measures what it leaves null on this machine, once, and caches it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config import conf_dir
from ftcluster.errors import ConfigError
from ftcluster.util.cache import cache_root
from ftcluster.util import atomic
from ftcluster.util.hardware import cpu_model

GIB = 2 ** 30


@dataclass
class PeakTflops:
    fp32: Optional[float] = None
    bf16: Optional[float] = None
    fp16: Optional[float] = None


@dataclass
class ClusterProfile:
    """Per device unless it says per node; bandwidths in GB/s (1e9 bytes), one direction."""

    name: str = "custom"
    device: str = "gpu"  # gpu or cpu
    nodes: int = 1
    gpus_per_node: Optional[int] = None
    memory_gib: Optional[float] = None
    reserved_gib: float = 0.0
    peak_tflops: PeakTflops = field(default_factory=PeakTflops)
    efficiency: float = 0.4
    memory_gb_per_s: Optional[float] = None
    intra_node_gb_per_s: float = 1.0
    inter_node_gb_per_s: float = 1.0
    network_efficiency: float = 0.7
    pcie_gb_per_s: Optional[float] = None
    host_memory_gib: Optional[float] = None  # per node
    host_memory_gb_per_s: Optional[float] = None  # per node

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    def usable_bytes(self) -> int:
        return int((self.memory_gib - self.reserved_gib) * GIB)

    def peak_flops(self, precision: str) -> float:
        value = getattr(self.peak_tflops, precision)
        if not value:
            raise ConfigError(f"cluster.peak_tflops.{precision}", f"profile {self.name} gives no peak for {precision}; "
                                                                  f"set cluster.peak_tflops.{precision}=TFLOPS")
        return value * 1e12


def cluster_dir() -> Path:
    return conf_dir() / "cluster"


def known_profiles() -> list[str]:
    return sorted(p.stem for p in cluster_dir().glob("*.yaml"))


def load_profile(name: str, overrides: list[str] = (), cpus_per_worker: int = 1) -> ClusterProfile:
    """Profile NAME (conf/cluster/NAME.yaml, or a path to a YAML file) with `KEY=VALUE` overrides (the part
    after `cluster.`); a CPU profile's nulls are filled in from this machine."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else cluster_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("cluster", f"unknown hardware profile '{name}'; known: {', '.join(known_profiles())} "
                                     f"(conf/cluster/), or a path to a YAML file with the same keys")
    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(ClusterProfile), raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"cluster.{key}", f"{str(exc).splitlines()[0]} (in {path})") from None
    profile = OmegaConf.to_object(merged)
    if profile.device not in ("gpu", "cpu"):
        raise ConfigError("cluster.device", f"got {profile.device!r}; it must be gpu or cpu (in {path})")
    if profile.device == "cpu":
        profile = _fill_from_this_machine(profile, cpus_per_worker)
    missing = [f.name for f in fields(profile) if getattr(profile, f.name) is None and f.name not in
               ("pcie_gb_per_s", "host_memory_gib", "host_memory_gb_per_s", "memory_gb_per_s")]
    if missing:
        raise ConfigError(f"cluster.{missing[0]}", f"profile {profile.name} ({path}) leaves it unset")
    return profile


def _fill_from_this_machine(profile: ClusterProfile, cpus_per_worker: int) -> ClusterProfile:
    cores = os.cpu_count() or 1
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    per_device = profile.gpus_per_node or max(cores // cpus_per_worker, 1)
    measured = measured_cpu()
    peaks = PeakTflops(**{dtype: getattr(profile.peak_tflops, dtype) or measured[f"{dtype}_tflops_per_core"]
                          * cpus_per_worker for dtype in ("fp32", "bf16", "fp16")})
    memory_bw = profile.memory_gb_per_s or measured["memory_gb_per_s_per_core"] * cpus_per_worker
    return replace(profile, gpus_per_node=per_device, memory_gib=profile.memory_gib or ram_gib / per_device,
                   peak_tflops=peaks, memory_gb_per_s=memory_bw,
                   host_memory_gib=profile.host_memory_gib or ram_gib,
                   host_memory_gb_per_s=profile.host_memory_gb_per_s or memory_bw * per_device)


# A measurement taken while other work holds the cores would be cached as this machine's peak for good (one
# taken at load 5-23 put MFU above 100% later): above this 1-minute load per core it is used, not cached.
QUIET_LOAD_PER_CORE = 0.5


def measured_cpu(seconds: float = 0.4) -> dict:
    """One core's matmul TFLOP/s per dtype and copy bandwidth, measured once per CPU model and torch
    version and cached in <FTCLUSTER_CACHE or ~/.cache/ftcluster>/hardware/cpu.json when the machine was
    quiet (delete it to measure again)."""
    import torch  # not at the top (here and below): `ftcluster plan` needs torch only to measure a CPU profile

    fingerprint = f"{cpu_model()} | torch {torch.__version__}"
    path = cache_root() / "hardware" / "cpu.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fingerprint:
            return cached
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker runs one thread per core (OMP_NUM_THREADS=cpus_per_worker)
    try:
        result = {"fingerprint": fingerprint,
                  "fp32_tflops_per_core": _matmul_tflops(torch.float32, 512, seconds),
                  "bf16_tflops_per_core": _matmul_tflops(torch.bfloat16, 128, seconds / 2),
                  "fp16_tflops_per_core": _matmul_tflops(torch.float16, 128, seconds / 2),
                  "memory_gb_per_s_per_core": _copy_gb_per_s(seconds / 2)}
    finally:
        torch.set_num_threads(threads)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    result["load1"] = round(load, 2)
    if load > QUIET_LOAD_PER_CORE * cores:
        print(f"[ftcluster] CPU peak measured at load {load:.1f} on {cores} cores: used for this run only, not "
              f"cached (MFU comes out too high and predicted throughput too low)", flush=True)
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def _best_rate(step, seconds: float, windows: int = 8) -> float:
    """Runs of `step` per second in the best of several short windows: other processes on the machine slow
    some windows down, rarely all of them."""
    step()  # warm-up: first-call allocations and kernel selection
    best = 0.0
    for _ in range(windows):
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / windows or runs < 1:
            step()
            runs += 1
        best = max(best, runs / elapsed)
    return best


def _matmul_tflops(dtype, n: int, seconds: float) -> float:
    import torch  # see measured_cpu

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 * _best_rate(lambda: torch.mm(a, b), seconds) / 1e12


def _copy_gb_per_s(seconds: float) -> float:
    import torch  # see measured_cpu

    src = torch.ones(16 * 2 ** 20)  # 64 MiB: past the caches
    dst = torch.empty_like(src)
    return 2 * src.nbytes * _best_rate(lambda: dst.copy_(src), seconds) / 1e9  # read and write

