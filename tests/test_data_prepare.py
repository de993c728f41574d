"""Preparing data at scale: the same rows for any number of prepare workers, the store that lets a second run
skip tokenization, mixtures, compressed shards, and bad records reported at their lines."""

import gzip
import json
import random
import time
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from ftcluster.config import ASSETS, apply_schema
from ftcluster.data import store
from ftcluster.data.prepare import prepare
from ftcluster.errors import DataError
from helpers import INLINE, TINY, losses, train

TOKENIZER = ASSETS / "models" / "tiny"
WORDS = "the of and to in is that for it as with was on be by at this have from or one had not but what".split()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def chats(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats of varied lengths (so packing has work to do)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(r.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(r.choices(WORDS, k=r.randint(3, 30)))})
            messages.append({"role": "assistant", "content": " ".join(r.choices(WORDS, k=r.randint(3, 60)))})
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list, opener=open) -> str:
    with opener(path, "wt") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return str(path)


def config(path, store_dir: Path, workers: int = 1, **data):
    trainer = {"max_seq_len": data.pop("max_seq_len", 256), "global_batch": 1, "micro_batch_per_device": 1}
    return apply_schema({"data": {"path": path, "format": "chat", "prepare_workers": workers,
                                  "prepared_dir": str(store_dir), **data}, "trainer": trainer})


def local_ray():
    from ftcluster.launch.cluster import connect

    connect(None, dashboard=True)  # list_tasks below asks the state API


def rows(folder: Path) -> list[dict]:
    return datasets.load_from_disk(str(folder / "train")).to_list()


def arrow_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "train").glob("*.arrow"))}


@pytest.mark.slow
def test_two_workers_prepare_the_same_rows_and_train_the_same_losses(tmp_path, monkeypatch):
    import ftcluster.data.assemble

    # Chunks of 64 rows: several, and written by Ray tasks for the 2-worker set however few (the 1-worker set's
    # in-process)
    monkeypatch.setattr(ftcluster.data.assemble, "CHUNK_ROWS", 64)
    monkeypatch.setattr(ftcluster.data.assemble, "PARALLEL_MIN_CHUNKS", 2)
    data = write_jsonl(tmp_path / "chats.jsonl", chats(1500))  # 3 units of 512 lines
    trainer = [*TINY, *INLINE, f"data.path={data}", "data.eval_path=null", "data.format=chat", "trainer.max_steps=3"]
    one = train(tmp_path / "one", *trainer, f"data.prepared_dir={tmp_path / 'store1'}", "data.prepare_workers=1")

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = config(data, tmp_path / "store2", workers=2, max_seq_len=256)
    cfg.trainer.global_batch = 8
    two = prepare(cfg, tok, None, connect=local_ray)
    assert two["prepare"]["workers"] == 2
    first = json.loads((tmp_path / "one" / "data" / "stats.json").read_text())
    assert first["prepare"]["workers"] == 1
    assert two["rows_digest"] == first["rows_digest"]
    assert rows(Path(two["dir"])) == rows(tmp_path / "one" / "data")
    import ray
    from ray.util.state import list_tasks

    # This cluster's address, not Ray's guess (the newest cluster started on the machine, alive or not). The state
    # API learns of finished tasks from events their workers send about once a second: asked at once, it may not
    # know them yet.
    deadline = time.monotonic() + 20
    while not (tasks := list_tasks(address=ray.get_runtime_context().gcs_address,
                                   filters=[("name", "=", "write_chunk")])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tasks, "the 2-worker set's chunks were not written on Ray"
    written = arrow_files(Path(two["dir"]))
    assert len(written) == -(-first["train"]["rows"] // 64) > 2 and written == arrow_files(tmp_path / "one" / "data")

    # The run over the 2-worker set reuses it (no tokenization) and trains the same losses.
    train(tmp_path / "two", *trainer, f"data.prepared_dir={tmp_path / 'store2'}", "data.prepare_workers=2")
    assert (tmp_path / "two" / "data").resolve() == Path(two["dir"]).resolve()
    assert losses(one.parent) == losses(tmp_path / "two") and len(losses(tmp_path / "two")) == 3


def test_second_train_reuses_the_set_without_tokenizing(tmp_path, capfd, monkeypatch):
    data = write_jsonl(tmp_path / "chats.jsonl", chats(64))
    run = [*TINY, *INLINE, f"data.path={data}", "data.eval_path=null", "data.format=chat", "trainer.max_steps=1",
           f"data.prepared_dir={tmp_path / 'store'}"]
    train(tmp_path / "first", *run)
    assert "reusing the prepared set" not in capfd.readouterr().out

    import ftcluster.data.shards as shards

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the second run tokenized")

    monkeypatch.setattr(shards, "encode_records", no_tokenizing)
    train(tmp_path / "second", *run)
    assert "reusing the prepared set" in capfd.readouterr().out
    assert (tmp_path / "first" / "data").resolve() == (tmp_path / "second" / "data").resolve()


# A driver's checks and data preparation in a fresh interpreter (what `ftcluster train` does before it launches),
# then which of the heavy libraries that imported.
DRIVER = """
import json, sys
from ftcluster.config import compose
from ftcluster.run.driver import prepare_run
payload = prepare_run(compose(sys.argv[1:]), ["train"])
print(json.dumps(sorted(m for m in ("torch", "transformers", "datasets", "pandas") if m in sys.modules)))
"""
# The same for `ftcluster data prepare`.
PREPARE_COMMAND = """
import json, sys
from ftcluster.data.tools.prepare import prepare_command
prepare_command(sys.argv[1:])
print(json.dumps(sorted(m for m in ("torch", "transformers", "datasets", "pandas") if m in sys.modules)))
"""


def test_a_driver_whose_set_is_prepared_imports_neither_torch_nor_transformers(tmp_path):
    """The second `ftcluster train` on the same data finds its set from the model folder's cached facts: the same
    set as the first, which loaded the tokenizer, and no import of torch, transformers or datasets. A changed
    tokenizer file is another folder's facts: read again, with the libraries."""
    import shutil
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(TOKENIZER, model)
    env = {"FTCLUSTER_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}

    def driver(name: str, script: str = DRIVER) -> tuple[list[str], str]:
        args = [*TINY, "launcher=processes", f"model.path={model}", f"output_dir={tmp_path / name}",
                f"data.prepared_dir={tmp_path / 'store'}"]
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1]), result.stdout

    first, said = driver("first")
    assert "torch" in first and "reusing the prepared set" not in said
    second, said = driver("second")
    assert second == [] and "reusing the prepared set" in said, said
    assert (tmp_path / "first" / "data").resolve() == (tmp_path / "second" / "data").resolve()
    # `ftcluster data prepare` with the same overrides finds the same set the same way
    command, said = driver("unused", PREPARE_COMMAND)
    assert command == [] and f"reused {(tmp_path / 'first' / 'data').resolve()} " in said, said

    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 2048}))
    third, said = driver("third")
    assert "transformers" in third, third  # the folder's facts are read again; its set is still the same one
    assert (tmp_path / "third" / "data").resolve() == (tmp_path / "first" / "data").resolve()


def test_mixture_realises_its_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", chats(40, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", chats(30, seed=2))
    cfg = config(None, tmp_path / "store", sources=[{"path": a, "weight": 2.0}, {"path": b, "weight": 0.5}])
    stats = prepare(cfg, tokenizer, None)
    mixture = stats["train"]["sources"]
    assert [(s["examples"], s["proportion"]) for s in mixture] == [(80, round(80 / 95, 4)), (15, round(15 / 95, 4))]
    assert stats["train"]["examples"] == 95 and stats["train"]["records"] == 70
    # The mixture is seeded: the same sample again, another with another seed.
    again = prepare(config(None, tmp_path / "store2", sources=cfg.data.sources), tokenizer, None)
    assert again["rows_digest"] == stats["rows_digest"]


def test_gzip_shards_in_a_folder_prepare_like_one_plain_file(tmp_path, tokenizer):
    records = chats(900, seed=3)
    plain = write_jsonl(tmp_path / "all.jsonl", records)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", records[:600])
    write_jsonl(shards / "part-1.jsonl.gz", records[600:], opener=gzip.open)
    from_plain = prepare(config(plain, tmp_path / "s1"), tokenizer, None)
    from_shards = prepare(config(str(shards), tmp_path / "s2"), tokenizer, None)
    assert from_shards["train"]["records"] == 900
    assert from_shards["rows_digest"] == from_plain["rows_digest"]
    # A glob names the same files.
    assert prepare(config(str(shards / "part-*"), tmp_path / "s3"), tokenizer, None)["rows_digest"] == \
        from_plain["rows_digest"]


@pytest.mark.slow
def test_bad_records_among_thousands_are_reported_at_their_lines_with_two_workers(tmp_path, tokenizer):
    records = chats(3000, seed=4)
    records[2344] = "{not json"
    records[2700] = {"messages": [{"role": "user", "content": "no answer"}]}
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    with pytest.raises(DataError) as caught:
        prepare(config(path, tmp_path / "store", workers=2), tokenizer, None, connect=local_ray)
    message = str(caught.value)
    assert message.startswith(f"{path}:2345: invalid JSON")
    assert "2 bad records in all" in message and f"{path}:2701: chat in 'messages' has no assistant turn" in message
    assert message.index(":2345:") < message.index(":2701:")
    assert not any(store.root(str(tmp_path / "store")).glob("*/stats.json"))  # nothing prepared


def test_an_interrupted_prepare_leaves_no_set(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "chats.jsonl", chats(50))
    import ftcluster.data.prepare as preparing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preparing, "write_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(path, tmp_path / "store"), tokenizer, str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "store").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    stats = prepare(config(path, tmp_path / "store"), tokenizer, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_whether_the_preparation_may_use_the_cluster_is_known_before_the_tokenizer(tmp_path):
    """launcher=local places its ranks early only when the data is prepared in the driver (ranks holding every
    CPU would starve Ray Data's encoders): the same choice prepare makes, from the config and the files alone."""
    from ftcluster.data.parallel import MIN_UNITS_FOR_WORKERS, may_use_cluster
    from ftcluster.data.sources import UNIT_LINES

    line = json.dumps(chats(1)[0])
    few = write_jsonl(tmp_path / "few.jsonl", [line] * (UNIT_LINES * (MIN_UNITS_FOR_WORKERS - 1)))
    many = write_jsonl(tmp_path / "many.jsonl", [line] * (UNIT_LINES * MIN_UNITS_FOR_WORKERS + 1))
    data = lambda path, workers: config(path, tmp_path / "store", workers=workers).data  # noqa: E731
    assert not may_use_cluster(data(few, 0), "sequences")
    assert may_use_cluster(data(many, 0), "sequences")
    assert not may_use_cluster(data(many, 1), "sequences")
    assert may_use_cluster(data(few, 2), "sequences")
    assert not may_use_cluster(data(many, 0), "pairs")  # preference sets are prepared in the driver
    assert may_use_cluster(data(str(tmp_path / "missing.jsonl"), 0), "sequences")  # prepare reports that


def test_a_few_chunks_are_written_by_the_driver_even_with_a_cluster(tmp_path, tokenizer, monkeypatch):
    """Below PARALLEL_MIN_CHUNKS the driver writes the rows itself: Ray's task workers would start slower than
    it writes. Here any use of Ray fails (the module cannot be imported), and a cluster is said to be there."""
    import sys

    import ftcluster.data.assemble
    import ftcluster.data.prepare as preparing

    monkeypatch.setattr(ftcluster.data.assemble, "CHUNK_ROWS", 8)
    monkeypatch.setattr(preparing, "on_cluster", lambda workers: True)
    monkeypatch.setitem(sys.modules, "ray", None)
    path = write_jsonl(tmp_path / "chats.jsonl", chats(200))
    stats = prepare(config(path, tmp_path / "store"), tokenizer, None)
    chunks = len(list((Path(stats["dir"]) / "train").glob("*.arrow")))
    assert 1 < chunks < ftcluster.data.assemble.PARALLEL_MIN_CHUNKS
    # From the threshold on, the same set goes to Ray's tasks (which cannot be imported here).
    monkeypatch.setattr(ftcluster.data.assemble, "PARALLEL_MIN_CHUNKS", chunks)
    with pytest.raises(ImportError):
        prepare(config(path, tmp_path / "store2"), tokenizer, None)


def test_the_driver_encodes_while_ray_starts_at_a_lower_priority_than_the_start(tmp_path, monkeypatch):
    """The thread that encodes units while Ray and its encoders start runs at MEANWHILE_NICENESS above the
    command's: it fills idle cores and yields them to Ray's processes. The rest of the process keeps its own."""
    import os
    import threading
    import types

    from ftcluster.data import parallel

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = []
    monkeypatch.setattr(parallel, "encode_unit",
                        lambda unit, *a: seen.append(niceness()) or types.SimpleNamespace(unit=unit.index))
    units = [types.SimpleNamespace(index=i) for i in range(3)]
    own = niceness()
    with parallel._encoding_meanwhile(units, None, None, tmp_path) as (done, _):
        deadline = time.monotonic() + 30
        while len(done) < len(units) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [min(19, own + parallel.MEANWHILE_NICENESS)] * len(units)
    assert niceness() == own


@pytest.fixture()
def two_nodes(tmp_path):
    """A Ray cluster of two nodes on this machine, one CPU each, brought up as on a real cluster: a head by
    launch/start_head.sh, a worker node by launch/join_worker.sh, Ray's token authentication on; stopped by
    launch/stop.sh (by the pids they recorded, never `ray stop`)."""
    import os
    import subprocess
    import sys

    from ftcluster.util.net import free_port

    def sh(*args):
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=180)

    launch = Path(__file__).resolve().parent.parent / "launch"
    temp_dir = f"/tmp/ftc-2n-{os.getpid()}-{free_port()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "FTCLUSTER_RAY_DIR": str(tmp_path / "ray-state"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    started = sh(launch / "start_head.sh", "--port", port, "--num-cpus=1", f"--temp-dir={temp_dir}",
                 "--dashboard-port", free_port(), f"--dashboard-agent-listen-port={free_port()}",
                 f"--ray-client-server-port={free_port()}")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        joined = sh(launch / "join_worker.sh", "--num-cpus=1", f"--temp-dir={temp_dir}-w",
                    f"--dashboard-agent-listen-port={free_port()}", f"127.0.0.1:{port}")
        assert joined.returncode == 0, joined.stdout + joined.stderr
        yield f"127.0.0.1:{port}", env, (Path(temp_dir), Path(f"{temp_dir}-w"))
    finally:
        stopped = sh(launch / "stop.sh")
        import shutil

        for folder in (temp_dir, f"{temp_dir}-w"):
            shutil.rmtree(folder, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.mark.slow
def test_two_nodes_prepare_the_rows_one_worker_prepares(tmp_path, two_nodes):
    """`ftcluster data prepare` on a 2-node Ray cluster (launch/ scripts), one encoder per node, writes the
    rows one worker writes. data.prepared_dir is a path both nodes read (here the same disk)."""
    import subprocess
    import sys

    address, env, node_dirs = two_nodes
    # 10 units of 512 lines: the driver encodes a few itself while it joins the cluster, and the 2 encoders
    # (one per node) take the rest.
    data = write_jsonl(tmp_path / "chats.jsonl", chats(5000, seed=5))

    def data_prepare(store_dir: Path, *extra: str) -> dict:
        args = ["model=tiny", "data=custom", f"data.path={data}", "data.format=chat", "data.eval_path=null",
                "trainer.max_seq_len=256", "trainer.global_batch=8", f"data.prepared_dir={store_dir}", *extra]
        done = subprocess.run([sys.executable, "-m", "ftcluster.cli", "data", "prepare", *args], capture_output=True,
                              text=True, env=env, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (stats,) = [json.loads(p.read_text()) for p in store_dir.glob("*/stats.json")]
        assert f"rows_digest {stats['rows_digest']}" in done.stdout
        return stats

    one = data_prepare(tmp_path / "one", "data.prepare_workers=1")
    two = data_prepare(tmp_path / "two", "data.prepare_workers=2", "launcher=ray", f"launcher.address={address}")
    assert (one["prepare"]["workers"], two["prepare"]["workers"]) == (1, 2)
    assert two["rows_digest"] == one["rows_digest"] and two["train"]["rows"] == one["train"]["rows"]
    assert rows(next((tmp_path / "two").glob("*/stats.json")).parent) == \
        rows(next((tmp_path / "one").glob("*/stats.json")).parent)
    # Both nodes encoded: each node's Ray logs hold an encoder actor's (Ray tags an actor's log with its name).
    for node in node_dirs:
        logs = (node / "session_latest" / "logs").glob("worker-*.out")
        assert any("_UnitEncoder" in log.read_text(errors="replace") for log in logs), node
