"""The rows each rank reads are a pure function of the step: complete, disjoint, seeded, resumable."""

import datasets
import pytest
import torch

from helpers import as_rows
from ftcluster.data.loader import GlobalBatchLoader, eval_batches
from ftcluster.data.prepare import FEATURES
from ftcluster.data.template import IGNORE
from ftcluster.errors import ConfigError, DataError, UserError

N = 35  # Not a multiple of the global batch: 3 rows are left over each epoch.


def make_rows(n=N, extra=0):
    """Row i starts with token i, so a batch says which rows it holds."""
    ids = [[i] + [7] * ((i + extra) % 4) for i in range(n)]
    return as_rows(datasets.Dataset.from_dict({"input_ids": ids, "labels": ids,
                                               "example_lengths": [[len(x)] for x in ids],
                                               "num_examples": [1] * n}, features=FEATURES))


@pytest.fixture(scope="module")
def rows():
    return make_rows()


def loader(rows, rank=0, world_size=2, global_batch=8, micro_batch=2, seed=0, shuffle=True):
    return GlobalBatchLoader(rows, global_batch=global_batch, micro_batch=micro_batch, rank=rank,
                             world_size=world_size, seed=seed, shuffle=shuffle, pad_id=-1, packed=True)


def read(batches):
    """The first token of each row (one example per row here) of flattened packed micro-batches."""
    return [int(i) for batch in batches for i in batch["input_ids"][0, batch["cu_seq_lens_q"][:-1].long()]]


def test_every_row_is_read_once_per_epoch_across_ranks(rows):
    ranks = [loader(rows, rank=r) for r in range(2)]
    assert ranks[0].steps_per_epoch == 4 and ranks[0].accum_steps == 2
    seen = [i for step in range(4) for r in ranks for i in read(r.micro_batches(step))]
    assert len(seen) == len(set(seen)) == 32


def test_ranks_together_read_the_global_batch_in_order(rows):
    ranks = [loader(rows, rank=r) for r in range(2)]
    for step in (0, 3, 4, 9):
        batches = [r.micro_batches(step) for r in ranks]
        assert all(len(b) == 2 and all(int(x["num_examples"]) == 2 for x in b) for b in batches)
        assert read(batches[0]) + read(batches[1]) == ranks[0].global_rows(step) == ranks[1].global_rows(step)


def test_world_size_does_not_change_the_global_batch(rows):
    # Same global_batch, other workers and micro-batch: the same rows per step.
    single = loader(rows, rank=0, world_size=1, micro_batch=4)
    assert all(read(single.micro_batches(s)) == loader(rows).global_rows(s) for s in range(6))


def test_epochs_differ_and_seed_decides(rows):
    a = loader(rows)
    epoch = lambda lo, e: [i for s in range(e * 4, e * 4 + 4) for i in lo.global_rows(s)]
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 1) == epoch(loader(rows), 1)
    assert epoch(a, 0) != epoch(loader(rows, seed=1), 0)
    assert epoch(loader(rows, shuffle=False), 2) == list(range(32))
    assert [a.epoch_of(s) for s in (0, 3, 4, 9)] == [0, 0, 1, 2]


def test_resume_reads_what_the_uninterrupted_run_reads(rows):
    original = loader(rows, rank=1)
    expected = {step: original.micro_batches(step) for step in range(12)}
    for step in (3, 4, 5, 11):  # Across epoch boundaries, each from a fresh loader.
        resumed = loader(rows, rank=1)
        resumed.check_state(original.state_dict(step))
        for got, want in zip(resumed.micro_batches(step), expected[step], strict=True):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) if torch.is_tensor(got[k]) else got[k] == want[k] for k in got)
    assert original.state_dict(5).items() >= {"epoch": 1, "index_in_epoch": 1, "num_rows": N}.items()


def test_check_state_refuses_changed_settings_or_data(rows):
    state = loader(rows).state_dict(6)
    with pytest.raises(ConfigError, match="trainer.global_batch=8, now 16"):
        loader(rows, global_batch=16, micro_batch=4).check_state(state)
    with pytest.raises(ConfigError, match="'seed'"):
        loader(rows, seed=3).check_state(state)
    with pytest.raises(UserError, match="training data changed since the checkpoint"):
        loader(make_rows(extra=1)).check_state(state)


def test_fewer_rows_than_the_global_batch(rows):
    with pytest.raises(DataError, match="has 35 rows .* trainer.global_batch must be at most 35"):
        loader(rows, global_batch=40, micro_batch=4)


def test_eval_batches_cover_each_row_once_with_equal_counts_per_rank():
    rows = make_rows(n=9)
    per_rank = [list(eval_batches(rows, 2, r, 4, pad_id=-1, packed=False)) for r in range(4)]
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]
    trained = [int(b["input_ids"][j, 0]) for bs in per_rank for b in bs for j in range(b["input_ids"].shape[0])
               if (b["labels"][j] != IGNORE).any()]
    assert sorted(trained) == list(range(9))
    filler = per_rank[1][1]
    assert (filler["labels"] == IGNORE).all() and int(filler["num_examples"]) == 0


def test_read_rows_maps_a_split_of_several_files_as_datasets_loads_it(tmp_path):
    """A split of several Arrow files (as a prepare on Ray writes one per chunk) reads, in order and with the
    same values, as datasets.load_from_disk reads it; the loader's rows come from it."""
    from ftcluster.data.rows import read_rows

    source = datasets.Dataset.from_dict({"input_ids": [[i] * (i % 3 + 1) for i in range(10)],
                                         "margin": [i / 4 for i in range(10)]})
    source.save_to_disk(str(tmp_path / "split"), max_shard_size=60)
    files = sorted((tmp_path / "split").glob("*.arrow"))
    assert len(files) > 1, "the test needs a split of several files"
    rows = read_rows(tmp_path / "split")
    assert len(rows) == 10 and rows.location == str(tmp_path / "split")
    assert list(rows) == datasets.load_from_disk(str(tmp_path / "split")).to_list() == source.to_list()
    assert rows.take([7, 2]) == [{"input_ids": [7, 7], "margin": 1.75}, {"input_ids": [2, 2, 2], "margin": 0.5}]
    assert rows[4] == {"input_ids": [4, 4], "margin": 1.0}
    assert rows.list_lengths("input_ids").tolist() == [i % 3 + 1 for i in range(10)]
