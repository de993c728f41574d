"""What a rank imports before its first step: DeepSpeed's Muon module without the compiler (TorchDynamo's
Inductor) that its import would otherwise load, with its kernels compiled on their first call instead."""

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
