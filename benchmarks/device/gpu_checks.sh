#!/usr/bin/env bash
# The first thing to run on a lent GPU machine (issue 20): one SFT, one DPO (cached reference) and one GRPO
# step on the GPU, in bf16 with flash-attention where flash-attn is installed (SDPA elsewhere), on
# Llama-3.2-1B's shape with its 128k vocabulary, then an export of the SFT checkpoint loaded back with
# transformers. One line per check: PASS / FAIL / SKIP, with MFU and peak memory. Under 10 minutes:
#   run(command="bash benchmarks/device/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Logs and run folders go to $OUT/gpu_checks (the table is printed last, so the reply's tail carries it).
# GRPO places Ray actors: it is SKIP where Ray cannot be imported (the lent machines cannot install it).
#
# GPU_CHECKS_DRY_RUN=1 runs the very same steps on this CPU with the tiny model (precision auto = fp32, SDPA):
# a check of the script and of the commands, not of the GPU.
set -uo pipefail
out="${OUT:-/tmp/out}"
runs="$out/gpu_checks"
mkdir -p "$runs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FTCLUSTER_CACHE="$runs/cache" RAY_USAGE_STATS_ENABLED=0
if [[ ${GPU_CHECKS_DRY_RUN:-0} == 1 ]]; then
    python=${PYTHON:-python}
    model=(model=tiny trainer.max_seq_len=512)
    attn=sdpa
    per_check_s=300
else
    python=python3
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed: run benchmarks/device/fetch_wheels.sh here first"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
    model=(model=llama3_2_1b_random strategy.precision=bf16 trainer.max_seq_len=4096)
    attn=$($python -c "import flash_attn" 2>/dev/null && echo flash_attention_2 || echo sdpa)
    per_check_s=150
fi
common=("${model[@]}" "model.attn_implementation=$attn" tracking=none peft=none strategy=zero2 trainer.max_steps=2 optim.warmup_steps=0
        trainer.eval_every_steps=0 trainer.eval_generate=false trainer.micro_batch_per_device=1 trainer.global_batch=2
        trainer.save_every_steps=2)
spmd=(launcher=processes launcher.workers=1)
declare -A status

check() {  # check NAME COMMAND...: its exit status, its output in $runs/NAME.log
    local name=$1; shift
    echo "[gpu_checks] $name: $*" >&2
    timeout "$per_check_s" "$@" >"$runs/$name.log" 2>&1
    status[$name]=$?
    tail -n 3 "$runs/$name.log" >&2
}

check sft $python -m ftcluster.cli train "${common[@]}" "${spmd[@]}" stage=sft data=json_extract \
    "output_dir=$runs/sft"
check dpo $python -m ftcluster.cli train "${common[@]}" "${spmd[@]}" stage=dpo data=json_extract_pairs \
    stage.dpo.reference=cached "output_dir=$runs/dpo"
if $python -c "import ray" 2>/dev/null; then
    check grpo $python -m ftcluster.cli train "${common[@]}" launcher=local launcher.workers=1 stage=grpo \
        stage.rl.prompts_per_step=2 stage.rl.samples_per_prompt=2 stage.rl.max_new_tokens=16 "output_dir=$runs/grpo"
else
    echo "[gpu_checks] grpo: skipped, Ray is not importable here" >&2
    status[grpo]=skip
fi
# The export: a checkpoint to a Hugging Face folder, loaded back and run once.
check export bash -c "$python -m ftcluster.cli export '$runs/sft/checkpoints/step-2' --out '$runs/export' && \
    $python -c \"import sys, torch; from transformers import AutoModelForCausalLM as M
m = M.from_pretrained(sys.argv[1]); x = torch.randint(0, 900, (1, 16))
assert torch.isfinite(m(input_ids=x).logits).all(); print('export loads and runs:', sys.argv[1])\" '$runs/export'"

echo
echo "gpu_checks ($([[ ${GPU_CHECKS_DRY_RUN:-0} == 1 ]] && echo "CPU dry run, tiny model" || echo "GPU, $attn")):"
failed=0
for name in sft dpo grpo export; do
    run="$runs/$name"; [[ $name == export ]] && run=/nonexistent
    $python benchmarks/device/check_report.py "$name" "${status[$name]}" "$run"
    [[ ${status[$name]} == 0 || ${status[$name]} == skip ]] || failed=1
done
exit "$failed"
