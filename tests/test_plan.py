"""The planner's formulas against numbers worked out by hand (the arithmetic is written out below), its
parameter counts against transformers and peft on the meta device, hardware profiles, `ftcluster plan
--json` for a 70B model, and its refusals. The planner against what real ranks hold: tests/test_train_distributed.py."""

import json
import os
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftcluster.cli import main
from ftcluster.plan import comms, flops, memory
from ftcluster.plan.profiles import load_profile, measured_cpu
from ftcluster.plan.setup import TrainSetup
from ftcluster.plan.shape import parameter_tensors, read_shape, shape_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "ftcluster" / "assets" / "model_configs"
LORA = OmegaConf.create({"method": "lora", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]})
NO_PEFT = OmegaConf.create({"method": "none"})


def setup(**changes) -> TrainSetup:
    """Llama-3-8B-style bf16 training on 8 GPUs, with DeepSpeed 0.19's defaults written out."""
    values = dict(world=8, zero_stage=0, offload_optimizer=False, offload_params=False, precision="bf16",
                  micro_batch=1, grad_accum=1, seq_len=4096, checkpointing=False, attention="sdpa", on_gpu=True,
                  peft_method="none", reduce_bucket_size=500_000_000, param_persistence_threshold=100_000,
                  model_persistence_threshold=2 ** 63 - 1, sub_group_size=1_000_000_000)
    return TrainSetup(**{**values, **changes})


# Llama-3-8B by hand: hidden h = 4096, 32 layers, 32 query heads and 8 KV heads of 128, MLP f = 14336,
# vocabulary V = 128256, untied output layer.
H, L, F, V, KV = 4096, 32, 14336, 128256, 8 * 128
LAYER_MATMULS = H * H + 2 * H * KV + H * H + 3 * H * F  # q, k, v, o, gate, up, down = 218,103,808
NORMS = L * 2 * H + H  # two per layer and the final one = 266,240
PARAMS_8B = 2 * V * H + L * LAYER_MATMULS + NORMS  # embeddings, output layer, layers, norms


def test_parameter_counts_equal_the_published_ones_and_transformers_on_the_meta_device():
    assert PARAMS_8B == 8_030_261_248  # Meta's model card: 8.03B
    # Llama-3-70B: h = 8192, 80 layers, 8 KV heads of 128, f = 28672.
    h70, kv70 = 8192, 8 * 128
    layer70 = 2 * h70 * h70 + 2 * h70 * kv70 + 3 * h70 * 28672 + 2 * h70
    assert sum(t.numel for t in parameter_tensors(read_shape(CONFIGS / "llama3_70b"))) == \
        2 * V * h70 + 80 * layer70 + h70 == 70_553_706_496
    from transformers import AutoConfig, AutoModelForCausalLM

    # Qwen2.5-7B: h = 3584, 28 layers, 4 KV heads of 128, f = 18944, V = 152064, biases on q, k and v.
    hq, kvq = 3584, 4 * 128
    layer_qwen = 2 * hq * hq + 2 * hq * kvq + (hq + 2 * kvq) + 3 * hq * 18944 + 2 * hq
    assert sum(t.numel for t in parameter_tensors(read_shape(CONFIGS / "qwen2_5_7b"))) == \
        2 * 152064 * hq + 28 * layer_qwen + hq == 7_615_616_512
    # The bundled SmolLM2 is planned from the copy of its converted config.json that ships with ftcluster.
    from ftcluster.config import compose
    from ftcluster.plan.shape import config_folder

    assert Path(config_folder(compose(["model=smollm2"]))) == CONFIGS / "smollm2_135m_instruct"
    # Tensor by tensor against transformers: Llama with tied embeddings, Mixtral (router, fused experts).
    for name in ("smollm2_135m_instruct", "mixtral_8x7b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / name))
        expected = {n.removeprefix("model."): p.numel() for n, p in model.named_parameters()}
        got = {t.name: t.numel for t in parameter_tensors(read_shape(CONFIGS / name))}
        assert got == expected, name  # tensor by tensor: ZeRO-3 partitions each one on its own


def test_lora_adapters_equal_peft_on_the_meta_device():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    # SmolLM2's widths on 2 layers (every layer is alike): what peft adds, adapter by adapter.
    two_layers = AutoConfig.from_pretrained(CONFIGS / "smollm2_135m_instruct", num_hidden_layers=2)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(two_layers),
                               LoraConfig(r=8, target_modules=list(LORA.target_modules)))
    expected = {n.removeprefix("base_model.model.model.").replace(".default", ""): p.numel()
                for n, p in model.named_parameters() if p.requires_grad}
    got = parameter_tensors(shape_from_config(two_layers, "smollm2, 2 layers"), LORA)
    assert {t.name: t.numel for t in got if t.trainable} == expected
    shape = read_shape(CONFIGS / "smollm2_135m_instruct")
    # By hand for SmolLM2 (h = 576, 3 KV heads of 64, f = 1536, 30 layers): r x (fan_in + fan_out) per linear;
    # DoRA adds a magnitude per output feature of each.
    per_layer = 8 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
    assert sum(t.numel for t in parameter_tensors(shape, LORA) if t.trainable) == 30 * per_layer == 2_442_240
    magnitudes = 576 + 2 * 192 + 576 + 2 * 1536 + 576
    dora = parameter_tensors(shape, OmegaConf.merge(LORA, {"method": "dora"}))
    assert sum(t.numel for t in dora if t.trainable) == 30 * (per_layer + magnitudes)


def test_flops_per_token_by_hand():
    shape = read_shape(CONFIGS / "llama3_8b")
    n = L * LAYER_MATMULS + V * H  # every matmul a token goes through; embedding lookups are not matmuls
    attention = L * 4 * 4096 * H  # QK^T and AV over the whole 4096-token row, forward
    full = flops.training_flops_per_token(shape, parameter_tensors(shape), 4096, checkpointing=False)
    assert full.model == full.hardware == 6 * n + 3 * attention == 51_470_401_536
    recomputed = flops.training_flops_per_token(shape, parameter_tensors(shape), 4096, checkpointing=True)
    # The decoder layers' forward once more (the output layer is not checkpointed): just under 4/3.
    assert recomputed.hardware == 6 * n + 3 * attention + 2 * L * LAYER_MATMULS + attention
    assert recomputed.hardware / recomputed.model == pytest.approx(1.313, abs=1e-3)
    # LoRA r=8 on all seven linears: 8 x (fan_in + fan_out) each; frozen weights get no weight gradient.
    adapters = L * 8 * (2 * (H + H) + 2 * (H + KV) + 3 * (H + F))
    lora = flops.training_flops_per_token(shape, parameter_tensors(shape, LORA), 4096, checkpointing=False)
    assert lora.model == 4 * (n + adapters) + 2 * adapters + 3 * attention == 36_586_913_792
    # Mixtral: only the router and 2 of the 8 experts per token.
    moe = read_shape(CONFIGS / "mixtral_8x7b")
    assert flops.layer_matmul_weights(moe) == 2 * H * H + 2 * H * KV + H * 8 + 2 * 3 * H * F == 394_297_344


def test_state_bytes_per_zero_stage_by_hand():
    tensors = parameter_tensors(read_shape(CONFIGS / "llama3_8b"))
    steps = 4  # torch AdamW's float32 `step` per optimizer tensor
    # ZeRO-0, bf16: every rank holds the bf16 weights, DeepSpeed's fp32 master copy and Adam's two moments.
    z0 = setup(zero_stage=0)
    assert memory.param_bytes(tensors, z0) == 2 * PARAMS_8B
    assert memory.optimizer_bytes(tensors, z0) == (4 + 8) * PARAMS_8B + steps * (9 * L + 3)  # 291 tensors
    # ZeRO-1, 8 ranks: two flat groups (matrices; norms), each padded to 2 x 8 elements and cut in 8.
    decay, norms = PARAMS_8B - NORMS, NORMS
    slices = math.ceil(decay / 16) * 2 + math.ceil(norms / 16) * 2
    z1 = setup(zero_stage=1)
    assert memory.param_bytes(tensors, z1) == 2 * PARAMS_8B  # both groups divide evenly: no padding
    assert memory.optimizer_bytes(tensors, z1) == 12 * slices + 2 * steps == 12 * PARAMS_8B // 8 + 8
    # ZeRO-3: an eighth of every tensor, and a whole copy of the 65 norms (4096 <= 1e5 elements: persistent).
    z3 = setup(zero_stage=3)
    assert memory.param_bytes(tensors, z3) == 2 * (PARAMS_8B // 8 + NORMS) == 2_008_097_792
    assert memory.optimizer_bytes(tensors, z3) == 12 * PARAMS_8B // 8 + 2 * steps
    # fp32 and ZeRO-0: the optimizer updates the weights themselves, no master copy.
    assert memory.optimizer_bytes(tensors, setup(zero_stage=0, precision="fp32")) == 8 * PARAMS_8B + steps * 291
    # LoRA under ZeRO-3 in bf16: peft's fp32 adapters stay fp32 (DeepSpeed does not cast a model built
    # partitioned), so the frozen base is bf16, the adapters 4 bytes, still with an fp32 master partition.
    lora = parameter_tensors(read_shape(CONFIGS / "llama3_8b"), LORA)
    adapters = L * 8 * (2 * (H + H) + 2 * (H + KV) + 3 * (H + F))
    # Adapters of at most 1e5 elements are persistent too: all but gate's and up's lora_B (14336 x 8) and
    # down's lora_A (8 x 14336): nine of 8 x 4096 and k's and v's lora_B of 1024 x 8 per layer.
    persistent_adapters = L * (9 * 8 * 4096 + 2 * 1024 * 8)
    z3_lora = setup(zero_stage=3, peft_method="lora")
    assert memory.param_bytes(lora, z3_lora) == \
        2 * (PARAMS_8B // 8 + NORMS) + 4 * (adapters // 8 + persistent_adapters) == 2_058_429_440
    assert memory.optimizer_bytes(lora, z3_lora) == 12 * adapters // 8 + steps  # one group: all matrices


def test_activation_bytes_by_hand():
    shape = read_shape(CONFIGS / "llama3_8b")
    tensors = parameter_tensors(shape)
    e = 2  # bf16
    # Per token and layer (Korthikanti et al. 2022, redone for the Llama block and sdpa with a mask):
    norms = 2 * (4 * H + 4 + e * H)  # each RMSNorm: fp32 input, 1/rms, the scaled input (its weight trains)
    attention = (e * H  # q, k, v's input
                 + e * H + 2 * e * H  # rotated q; k and v expanded from 8 to 32 heads by repeat_kv
                 + e * H + 4 * 32)  # the output (o_proj's input) and the fp32 softmax statistics
    mlp = e * H + 4 * e * F  # the input of gate/up; gate, silu(gate), up, their product (down's input)
    per_layer = norms + attention + mlp
    assert memory.layer_activation_bytes_per_token(shape, setup(), tensors) == per_layer == 213_128
    # The final norm and the output layer's input, fp32 log-probabilities, ids and labels, rotary cos/sin.
    head = 4 * H + 4 + e * H + e * H + 4 * V + 16 + 2 * e * 128
    mask = L * e * 4096 * 4096  # packed rows' mask, made additive (bf16) in every layer
    assert memory.activation_bytes(shape, setup(), tensors) == 4096 * (L * per_layer + head) + mask
    # Checkpointing keeps each layer's input and the boolean mask; backward recomputes one layer at a time.
    ckpt = setup(checkpointing=True)
    assert memory.activation_bytes(shape, ckpt, tensors) == 4096 * (L * e * H + head) + 4096 * 4096
    assert memory.recompute_bytes(shape, ckpt, tensors) == 4096 * per_layer
    # flash-attention: keys and values at their 8 heads, no mask.
    flash = setup(attention="flash_attention_2")
    assert memory.layer_activation_bytes_per_token(shape, flash, tensors) == per_layer - 2 * e * (H - KV)


def test_peak_is_the_largest_moment_on_top_of_the_states():
    shape = read_shape(CONFIGS / "llama3_8b")
    tensors = parameter_tensors(shape)
    z3 = setup(zero_stage=3, micro_batch=2)
    m = memory.rank_memory(shape, z3, tensors)
    states = m.params + m.optimizer + m.buffers  # ZeRO-3 keeps its reduce bucket from the start
    assert m.buffers == 500_000_000 * 2  # DeepSpeed's reduce bucket, bf16
    # At the turn from forward to backward: the loss gradient (two fp32 vocabulary-wide tensors), the
    # gathered output layer and the layer the backward gathers next (its norms are persistent), and the
    # gradient partitions ZeRO-3 keeps.
    gathered = 2 * (V * H + LAYER_MATMULS)
    turn = 2 * 4 * V * 2 * 4096 + gathered + 2 * (PARAMS_8B // 8)
    assert (m.phase, m.transient) == ("backward", turn)
    assert m.peak == states + m.activations + turn

    # ZeRO-2 in fp32 on a CPU, 4 micro-batches a step, on 2 ranks, with the trainable weights small enough
    # that the end of the backward comes out on top: the bucket's pages are written only as gradients arrive
    # (not at the turn), and at the end it is full beside the rank's new gradient partition, its fp32 copy
    # and the partition the earlier micro-batches accumulated. DeepSpeed releases it before the step.
    cpu = setup(world=2, zero_stage=2, precision="fp32", on_gpu=False, grad_accum=4, seq_len=8)
    small = [t for t in tensors if t.name.startswith("layers.0.")]
    m = memory.rank_memory(shape, cpu, small)
    numel = sum(t.numel for t in small)
    groups = memory.optimizer_groups(small)
    partition = sum(memory._zero12_partition(g, 2) for g in groups)
    assert m.buffers == 4 * numel  # the bucket, as far as the gradients reach
    assert m.gradients == 4 * partition + 4 * partition
    held = m.params + m.optimizer
    assert held == 4 * 2 * partition + (4 + 4 + 4) * partition + 4 * len(groups)
    assert (m.phase, m.transient) == ("reduce", 4 * numel + 4 * partition)
    assert m.peak == held + m.gradients + m.transient
    # On a GPU, with long rows: the bucket is allocated whole as the backward starts, beside the activations.
    gpu = memory.rank_memory(shape, setup(world=2, zero_stage=2, precision="fp32", grad_accum=4), small)
    assert gpu.buffers == 4 * 500_000_000 and gpu.phase == "backward"
    assert gpu.transient == 2 * 4 * V * 4096 + 4 * partition + gpu.buffers
    assert gpu.peak == held + gpu.activations + gpu.transient


def test_communication_bytes_per_zero_stage_by_hand():
    tensors = parameter_tensors(read_shape(CONFIGS / "llama3_8b"))
    ring = 7 / 8  # each rank sends (W-1)/W of what a reduce-scatter or all-gather moves
    b, accum = 2, 4
    assert comms.comm_bytes_per_step(tensors, setup(zero_stage=0, grad_accum=accum)) == int(2 * PARAMS_8B * b * ring)
    assert comms.comm_bytes_per_step(tensors, setup(zero_stage=2, grad_accum=accum)) == \
        int((accum + 1) * PARAMS_8B * b * ring)
    # ZeRO-3: gather the weights for forward and backward and reduce-scatter the gradients per micro-batch;
    # the persistent norms are not gathered, their gradients all-reduced.
    sharded = PARAMS_8B - NORMS
    assert comms.comm_bytes_per_step(tensors, setup(zero_stage=3, grad_accum=accum)) == \
        int(accum * (3 * sharded + 2 * NORMS) * b * ring)
    assert comms.comm_bytes_per_step(tensors, setup(zero_stage=3, world=1)) == 0


def test_profiles_load_with_overrides_and_the_cpu_one_measures_once(tmp_path, monkeypatch):
    h100 = load_profile("h100_sxm", ["nodes=4", "peak_tflops.bf16=900"])
    assert (h100.devices, h100.peak_flops("bf16"), h100.peak_flops("fp32")) == (32, 900e12, 67e12)
    for name in ("h100_pcie", "h200", "a100_40gb", "a100_80gb", "l40s"):
        assert load_profile(name).peak_tflops.bf16 in (756, 989, 312, 362)
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path))
    # Measured on a busy machine: used, never cached as the machine's peak.
    monkeypatch.setattr("os.getloadavg", lambda: (9.0 * (os.cpu_count() or 1), 0.0, 0.0))
    busy = measured_cpu(seconds=0.02)
    assert busy["fp32_tflops_per_core"] > 0 and not (tmp_path / "hardware" / "cpu.json").exists()
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    measured = measured_cpu(seconds=0.02)
    cached = json.loads((tmp_path / "hardware" / "cpu.json").read_text())
    assert cached == measured and measured["fp32_tflops_per_core"] > 0 and measured["memory_gb_per_s_per_core"] > 0
    # Known numbers in the cache: a worker of 2 cores gets twice one core's peak; nothing is measured again.
    cached.update(fp32_tflops_per_core=0.05, memory_gb_per_s_per_core=5.0)
    (tmp_path / "hardware" / "cpu.json").write_text(json.dumps(cached))
    monkeypatch.setattr("ftcluster.plan.profiles._matmul_tflops", lambda *a: pytest.fail("measured again"))
    cpu = load_profile("cpu", cpus_per_worker=2)
    assert cpu.peak_flops("fp32") == pytest.approx(0.1e12) and cpu.memory_gb_per_s == pytest.approx(10.0)
    assert cpu.gpus_per_node * 2 <= max(2, os.cpu_count())
    assert cpu.memory_gib * cpu.gpus_per_node == pytest.approx(cpu.host_memory_gib)


def test_plan_json_for_a_70b_model_recommends_the_fastest_that_fits(capsys):
    code = main(["plan", "model=llama3_70b", "cluster=h100_sxm", "peft=none", "strategy.precision=bf16",
                 "trainer.max_seq_len=4096", "trainer.global_batch=32", "--max-micro-batch", "4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    candidates = out["candidates"]
    assert len(candidates) == 8 * 2 * 3  # strategies x checkpointing x micro-batches 1, 2, 4
    assert all(c["grad_accum"] == 32 // (c["micro_batch"] * 8) for c in candidates)
    fitting = [c for c in candidates if c["fits"]]
    best = out["recommended"]
    assert best["tokens_per_s"] == max(c["tokens_per_s"] for c in fitting)
    assert best["peak_bytes_per_rank"] <= best["usable_bytes_per_rank"] == int((79.1 - 2.0) * 2 ** 30)
    # 70.6B bf16 weights alone (141 GB) need ZeRO-3 across 8 x 80 GB, and a full fine-tune its offload.
    assert all(c["zero_stage"] == 3 for c in fitting) and best["offload_optimizer"]
    assert out["model"]["total_params"] == 70_553_706_496
    assert f"trainer.micro_batch_per_device={best['micro_batch']}" in out["recommended_overrides"]


@pytest.mark.parametrize("problem, expected", [
    ("cluster=h100", "unknown hardware profile 'h100'; known: a100_40gb, a100_80gb, cpu, h100_pcie, h100_sxm, h200, l40s"),
    ("cluster.peak_tflops.bf16=fast", "cluster.peak_tflops.bf16"),
    ("json", "config.json:3: not valid JSON"),
    ("model_type", "model_type 'gpt2' is not one the planner models"),
    ("folder", "holds no config.json"),
])
def test_bad_plan_input_is_one_clear_error(capsys, tmp_path, problem, expected):
    model = tmp_path / "model"
    model.mkdir()
    args = ["model=tiny", "cluster=h100_sxm"] if problem in ("json", "model_type", "folder") else ["model=tiny"]
    if problem == "json":
        (model / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    elif problem == "model_type":
        (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    if problem in ("json", "model_type", "folder"):
        args.append(f"model.path={model}")
    else:
        args.append(problem)
    code = main(["plan", *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    if problem == "json":
        assert str(model / "config.json") in err
