#!/usr/bin/env bash
# Run HERE (a machine with package registries), from the repository root: puts into .whl/ the wheels the
# lent GPU machine lacks for `ftcluster bench` with launcher=processes (it has torch, transformers, peft,
# accelerate, safetensors, matplotlib, pyarrow..., and no network). Ray is not among them (its wheel alone
# is over the 64 MiB a call may carry): launcher=processes does without it.
#   benchmarks/device/fetch_wheels.sh [PYTHON_VERSION]    # the device's python: 3.12 (default)
set -euo pipefail
py="${1:-3.12}"
dest=.whl
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# Versions as this project's environment resolves them (ENVIRONMENT.md), one of each.
binary=(pydantic_core==2.50.5 multiprocess==0.70.19)
pure=(pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 hydra-core==1.3.8
      omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
  -d "$dest" "${binary[@]}" "${pure[@]}"
# Published as source only: built here into pure-Python wheels (DeepSpeed without its C++ ops, as installed
# here; its setup imports torch, so this environment's torch builds it).
DS_BUILD_OPS=0 pip wheel --quiet --no-deps --no-build-isolation -w "$dest" deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
ls -l "$dest"
du -sh "$dest"
