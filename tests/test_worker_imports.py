"""What a rank imports before its first step: DeepSpeed's Muon module without the compiler (TorchDynamo's
Inductor) that its import would otherwise load, with its kernels compiled on their first call instead; the
prepared rows without the `datasets` library."""

import subprocess
import sys

# In a fresh interpreter: the rank's preload, then the Muon kernel called twice with torch.compile recorded.
PROBE = """
import sys
import torch
from ftcluster.train import engine

engine.import_deferred()
print("inductor imported:", "torch._inductor.compile_fx" in sys.modules)
from deepspeed.runtime.zero.muon import original_muon

compiled = []
def record(function):
    compiled.append(function)
    return function  # eager: what the compiled kernel computes
torch.compile = record
kernel = original_muon.zeropower_via_newtonschulz5
G = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
first, second = kernel(G, 3), kernel(G, 3)
print("compiled:", [f.__name__ for f in compiled])
print("same as eager:", torch.equal(first, kernel.__wrapped__(G, 3)) and torch.equal(first, second))
"""


def test_muon_is_imported_without_the_compiler_and_compiles_on_first_call():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-3:] == ["inductor imported: False",
                                               "compiled: ['zeropower_via_newtonschulz5']",
                                               "same as eager: True"], result.stdout + result.stderr[-2000:]


def test_the_workers_read_their_rows_without_datasets_or_pandas(tmp_path):
    """Imported, then a split read, a loader built over it and a step's micro-batches fetched, as a rank does:
    neither `datasets` nor pandas (which some pyarrow calls import) is loaded."""
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[i] * (i + 1) for i in range(8)], "labels": [[i] * (i + 1) for i in range(8)],
                                "example_lengths": [[i + 1] for i in range(8)], "num_examples": [1] * 8}
                               ).save_to_disk(str(tmp_path / "train"))
    probe = ("import sys, ftcluster.train.worker, ftcluster.eval.scorer, ftcluster.rl.context\n"
             "from ftcluster.data.loader import GlobalBatchLoader\n"
             "from ftcluster.data.rows import read_rows\n"
             f"loader = GlobalBatchLoader(read_rows({str(tmp_path / 'train')!r}), 4, 2, 0, 1, 0, True, 0, True)\n"
             "batches = loader.micro_batches(1)\n"
             "print(len(batches), loader.rows_digest, sorted(m for m in ('datasets', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    count, _, loaded = result.stdout.splitlines()[-1].split(" ", 2)
    assert (count, loaded) == ("2", "[]"), result.stdout + result.stderr[-2000:]
