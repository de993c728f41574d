"""Running encode_unit over every unit: in this process (one worker), or on a Ray cluster with Ray Data.

With Ray, the units (a few numbers each) are a Ray dataset; `map_batches` runs a pool of encoder actors,
each holding one tokenizer, one unit per call; every actor writes its shard to the shared shards folder and
returns the unit's summary. Nothing the driver does depends on which actor ran which unit, or when: the
summaries are put back in unit order, so the prepared rows are the same for any number of workers or nodes.
Units are small (UNIT_LINES records), so a long example holds up one small unit, never a worker's share.
While Ray and its encoders start (seconds), this process encodes units from the front and the encoders take
them from the back; either skips a unit whose shard is already written, so no start-up time is idle.

The data layer starts no cluster itself (that is the launchers' job, with their token authentication): a
caller that wants workers passes `connect`, which joins or starts one, or connects Ray before calling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ftcluster.data.encode import Settings
from ftcluster.data.shards import Summary, encode_unit, shard_path
from ftcluster.data.sources import Unit, split_sources, unit_count_up_to


# Below this many units (UNIT_LINES records each) data.prepare_workers=0 encodes in this process: it finishes
# in seconds, sooner than a cluster or an actor pool would start.
MIN_UNITS_FOR_WORKERS = 16
# The niceness of this process's thread that encodes while Ray and its encoders start.
MEANWHILE_NICENESS = 10


def worker_count(requested: int, connect: Callable[[], None] | None, unit_count: int) -> int:
    """data.prepare_workers as encode_units takes it: an explicit number as asked; 0, every core of the cluster
    (counted once it is connected), for a data set large enough to repay starting workers and with a cluster at
    hand or one to start; else 1, this process alone."""
    if requested > 0:
        return requested
    if unit_count < MIN_UNITS_FOR_WORKERS:
        return 1
    if _ray_if_connected() is not None or (connect is not None and (os.cpu_count() or 1) > 1):
        return 0
    return 1


def may_use_cluster(data, kind: str) -> bool:
    """Whether preparing `data` (a config's data section) for a stage reading `kind` may run on a Ray cluster:
    worker_count's answer, as prepare asks it, from the units counted no further than it looks. Known before the
    tokenizer is loaded (a set already prepared may then need no cluster at all); any error is the
    preparation's to report, so it answers True."""
    requested = data.get("prepare_workers", 1)
    if kind != "sequences" or requested == 1:
        return False
    try:
        sources = [s for split in ("train", "eval") for s in split_sources(data, split) or []]
        count = unit_count_up_to(sources, MIN_UNITS_FOR_WORKERS)
    except Exception:
        return True
    return count > 1 and worker_count(requested, connect=lambda: None, unit_count=count) != 1


def pool_size(workers: int) -> int:
    """The number of encoders `workers` stands for (0: every core of the connected cluster)."""
    ray = _ray_if_connected()
    return workers or (max(1, int(ray.cluster_resources().get("CPU", 1))) if ray is not None else 1)


def encode_units(units: list[Unit], settings: Settings, tokenizer, shards: Path, workers: int,
                 connect: Callable[[], None] | None) -> Iterator[Summary]:
    """Each unit's summary, as units finish (any order); a unit's shard is complete before its summary.
    `workers` as worker_count gives it."""
    if workers == 1 or len(units) <= 1:
        for unit in units:
            yield encode_unit(unit, settings, tokenizer, shards)
        return
    # Starting Ray takes seconds (most of ten on a small machine), and so does starting its encoders, each loading
    # a tokenizer: a thread of this process encodes units from the front meanwhile, until the first encoder
    # reports; the encoders take units from the back, and either skips a unit whose shard is written already.
    # (Ray is started from the main thread: its processes die with the thread that started them.)
    seen: set[int] = set()
    with _encoding_meanwhile(units, settings, tokenizer, shards) as (done, encoders_running):
        cluster(connect)
        rest = [u for u in reversed(units) if not shard_path(shards, u.index).exists()]
        for summary in _on_ray(rest, settings, tokenizer, shards, pool_size(workers)) if rest else ():
            encoders_running.set()
            if summary is not None and summary.unit not in seen:
                seen.add(summary.unit)
                yield summary
    for summary in done:
        if summary.unit not in seen:  # both may have encoded a unit, alike: the first summary counts
            seen.add(summary.unit)
            yield summary
    missing = sorted({u.index for u in units} - seen)
    if missing:
        raise RuntimeError(f"units {missing[:5]} were encoded by no one; see the log above")


@contextmanager
def _encoding_meanwhile(units: list[Unit], settings: Settings, tokenizer, shards: Path):
    """Encode units in order in a thread while the block runs, until the event it yields is set or a unit is
    found done; leaving the block stops it after the unit at hand (raising what the thread raised). Yields
    (the summaries so far, the event)."""
    done: list[Summary] = []
    stop, failed = threading.Event(), []

    def encode():
        try:
            # This thread fills the cores Ray's start leaves idle; at full priority it took them from that start
            # (2 cores: the encoders began 2 s later, for the few units it encoded meanwhile). Linux gives each
            # thread its own niceness.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MEANWHILE_NICENESS)
            for unit in units:
                if stop.is_set() or shard_path(shards, unit.index).exists():
                    return
                done.append(encode_unit(unit, settings, tokenizer, shards))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=encode, name="ftcluster-encode-while-ray-starts", daemon=True)
    thread.start()
    try:
        yield done, stop
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]


def _on_ray(units: list[Unit], settings: Settings, tokenizer, shards: Path, workers: int) -> Iterator[Summary]:
    """The units encoded by a pool of `workers` actors on the connected cluster, with Ray Data."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines would bury the launch log
    # The driver shows its own bar, in records; Ray Data would warn, on every first run, that its own is off.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False  # order comes from the unit numbers, not from Ray
    # One block per unit, so the pool hands units out one at a time and no actor waits behind a long one.
    dataset = ray.data.from_items([{"unit": pickle.dumps(unit)} for unit in units], override_num_blocks=len(units))
    pool = ray.data.ActorPoolStrategy(size=min(workers, len(units)))
    encoded = dataset.map_batches(_UnitEncoder, batch_size=1, compute=pool, num_cpus=1,
                                  fn_constructor_kwargs={"settings": settings, "tokenizer": tokenizer,
                                                         "shards": str(shards)})
    for batch in encoded.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
        for blob in batch["summary"]:
            yield pickle.loads(blob)


def on_cluster(workers: int) -> bool:
    """Whether work for `workers` (as pool_size counts them) goes to the connected Ray cluster: more than one,
    and a cluster to run them."""
    return workers > 1 and _ray_if_connected() is not None


def cluster(connect: Callable[[], None] | None):
    """The ray module, connected: to the cluster this process is on, else to the one `connect` joins or starts."""
    ray = _ray_if_connected()
    if ray is None:
        if connect is None:
            raise RuntimeError("data.prepare_workers > 1 needs a Ray cluster: pass `connect` or call ray.init first")
        connect()
        ray = _ray_if_connected()
    return ray


class _UnitEncoder:
    """A Ray Data actor: one tokenizer, loaded once, for every unit it is handed."""

    def __init__(self, settings: Settings, tokenizer, shards: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per actor; Ray gives each its own
        self.settings, self.tokenizer, self.shards = settings, tokenizer, Path(shards)

    def __call__(self, batch: dict) -> dict:
        units = [pickle.loads(blob) for blob in batch["unit"]]
        # A unit whose shard is written was encoded by the driver while the encoders started (encode_units).
        summaries = [None if shard_path(self.shards, unit.index).exists()
                     else encode_unit(unit, self.settings, self.tokenizer, self.shards) for unit in units]
        return {"summary": [pickle.dumps(s) for s in summaries]}


def _ray_if_connected():
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None
