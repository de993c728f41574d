"""Running encode_unit over every unit: in this process (one worker), or on a Ray cluster with Ray Data.

With Ray, the units (a few numbers each) are a Ray dataset; `map_batches` runs a pool of encoder actors,
each holding one tokenizer, one unit per call; every actor writes its shard to the shared shards folder and
returns the unit's summary. Nothing the driver does depends on which actor ran which unit, or when: the
summaries are put back in unit order, so the prepared rows are the same for any number of workers or nodes.
Units are small (UNIT_LINES records), so a long example holds up one small unit, never a worker's share.

The data layer starts no cluster itself (that is the launchers' job, with their token authentication): a
caller that wants workers passes `connect`, which joins or starts one, or connects Ray before calling.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable, Iterator

from ftcluster.data.encode import Settings
from ftcluster.data.shards import Summary, encode_unit
from ftcluster.data.sources import Unit


# Below this many units (UNIT_LINES records each) data.prepare_workers=0 encodes in this process: it finishes
# in seconds, sooner than a cluster or an actor pool would start.
MIN_UNITS_FOR_WORKERS = 16


def worker_count(requested: int, connect: Callable[[], None] | None, unit_count: int) -> int:
    """data.prepare_workers: 0 means every core of the connected cluster (else of this machine), for a data
    set large enough to repay starting them; an explicit number is taken as asked."""
    if requested > 0:
        return requested
    if unit_count < MIN_UNITS_FOR_WORKERS:
        return 1
    ray = _ray_if_connected()
    if ray is None and connect is not None and (os.cpu_count() or 1) > 1:
        connect()
        ray = _ray_if_connected()
    if ray is not None:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    # No cluster at hand and no way to reach one: this process alone.
    return 1


def encode_units(units: list[Unit], settings: Settings, tokenizer, shards: Path, workers: int,
                 connect: Callable[[], None] | None) -> Iterator[Summary]:
    """Each unit's summary, as units finish (any order); a unit's shard is complete before its summary."""
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            yield encode_unit(unit, settings, tokenizer, shards)
        return
    ray = _ray_if_connected()
    if ray is None:
        if connect is None:
            raise RuntimeError("data.prepare_workers > 1 needs a Ray cluster: pass `connect` or call ray.init first")
        connect()
        ray = _ray_if_connected()
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines would bury the launch log
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows its own bar, in records
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


class _UnitEncoder:
    """A Ray Data actor: one tokenizer, loaded once, for every unit it is handed."""

    def __init__(self, settings: Settings, tokenizer, shards: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per actor; Ray gives each its own
        self.settings, self.tokenizer, self.shards = settings, tokenizer, Path(shards)

    def __call__(self, batch: dict) -> dict:
        summaries = [encode_unit(pickle.loads(blob), self.settings, self.tokenizer, self.shards)
                     for blob in batch["unit"]]
        return {"summary": [pickle.dumps(s) for s in summaries]}


def _ray_if_connected():
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None
