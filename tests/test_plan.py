"""`megatron-staged plan` and `train --dry-run`: the figures are the formulas', worked by hand here.

Every expected number below is written out from the formulas (docs/scaling.md) for a small case,
not produced by the planner's helpers; the parameter count is also checked against the GPTModel
megatron-core actually builds.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, _env
from megatron_staged.cli import main as cli_main
from megatron_staged.config import Config, apply_mapping
from megatron_staged.planning.cluster import Hardware, choose_layout, cluster_report, plan_stage
from megatron_staged.planning.memory import (GIB, Recompute, count_parameters, estimate_memory,
                                             parameters_on_pipeline_rank)
from megatron_staged.planning.recipe import parse_recipe, plan_stages

EXAMPLES = ROOT / "examples"
# world size each example config is written for (every YAML under examples/ must be listed)
ZERO_ONE = ["zero_one_layer_7b/" + n for n in ("gpt2_7b_from_0_layers.yaml", "gpt2_7b_from_1_layer.yaml",
                                                 "llama_7b_from_0_layers.yaml", "llama_7b_from_1_layer.yaml")]
EXAMPLE_WORLD = {"quickstart.yaml": 4, "llama_7b_progressive_depth/llama_7b.yaml": 64, **{z: 64 for z in ZERO_ONE}}
# the 7B's tokenizer is not here; it plans with selective recomputation (as its train.sh runs it)
EXAMPLE_FLAGS = {"llama_7b_progressive_depth/llama_7b.yaml": ["--vocab-size", "32000", "--recompute-granularity",
                                                              "selective"],
                 # zero/one-layer 7B recipes: GPT-2's BPE (50257) and a 32000-token SentencePiece vocabulary
                 **{z: ["--vocab-size", "50257" if "gpt2" in z else "32000"] for z in ZERO_ONE}}


def small_llama(**over) -> Config:
    """h 64, 4 heads of 16, 2 KV groups, SwiGLU FFN 176, vocab 256, seq 32, micro batch 2."""
    cfg = Config()
    apply_mapping(cfg, dict(dict(
        model_family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, ffn_hidden_size=176, seq_length=32, padded_vocab_size=256, bf16=True,
        use_distributed_optimizer=True, sequence_parallel=True, micro_batch_size=2, global_batch_size=8), **over),
        "test")
    return cfg


def small_gpt2(**over) -> Config:
    """h 64, 4 heads, FFN 4h = 256, vocab 128, seq 32 (learned positions), tied, biases, LayerNorm."""
    cfg = Config()
    apply_mapping(cfg, dict(dict(model_family="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4,
                                 seq_length=32, padded_vocab_size=128), **over), "test")
    return cfg


# ---- parameters --------------------------------------------------------------------------------

# llama layer: norm 64 + QKV 64*(4+2*2)*16 = 8192 + proj 64*64 = 4096 + norm 64 + FC1 64*2*176 = 22528
#              + FC2 176*64 = 11264                                                     = 46208
LLAMA_LAYER = 64 + 8192 + 4096 + 64 + 22528 + 11264
# gpt2 layer: LN 2*64 + QKV 64*192 + 192 + proj 64*64 + 64 + LN 128 + FC1 64*256 + 256 + FC2 256*64 + 64 = 49984
GPT2_LAYER = 128 + 12288 + 192 + 4096 + 64 + 128 + 16384 + 256 + 16384 + 64


def test_parameter_count_by_hand():
    assert LLAMA_LAYER == 46208 and GPT2_LAYER == 49984
    llama = count_parameters(small_llama().model)
    # word embedding 256*64 + untied output 256*64 + final RMSNorm 64 + 2 layers
    assert llama.total == 16384 + 16384 + 64 + 2 * 46208 == 125248
    gpt2 = count_parameters(small_gpt2().model)
    # word embedding 128*64 (tied output) + positions 32*64 + final LayerNorm 128 + 2 layers
    assert gpt2.total == 8192 + 2048 + 128 + 2 * 49984 == 110336
    # the 7B example's final model: per layer 2 RMSNorms + QKV 4096*(32+2*8)*128 + proj 4096^2
    # + SwiGLU FC1 4096*2*11008 + FC2 11008*4096; 32 layers, untied 32000-word embedding and output, final norm
    layer_7b = 2 * 4096 + 4096 * 48 * 128 + 4096 * 4096 + 4096 * 2 * 11008 + 11008 * 4096
    cfg = Config()
    apply_mapping(cfg, dict(model_family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                            num_attention_heads=32, group_query_attention=True, num_query_groups=8,
                            seq_length=4096, padded_vocab_size=32000), "test")
    assert count_parameters(cfg.model).total == 32 * layer_7b + 2 * 32000 * 4096 + 4096 == 5_933_109_248


def test_parameter_count_equals_the_built_model():
    """count_parameters against sum(numel) of megatron-core's GPTModel as the trainer builds it."""
    code = r"""
import json, warnings
warnings.filterwarnings("ignore")
from megatron_staged.config import Config, apply_mapping
from megatron_staged.runtime.distributed import init_distributed, set_parallel_layout
from megatron_staged.model.builder import build_model
from megatron_staged.planning.memory import count_parameters
init_distributed(); set_parallel_layout(1, 1)
out = []
for d in json.loads(SPECS):
    cfg = Config(); apply_mapping(cfg, d, "test")
    model = build_model(cfg, pre_process=True, post_process=True)
    out.append([sum(p.numel() for p in model.parameters()), count_parameters(cfg.model).total])
print("RESULT", json.dumps(out))
"""
    specs = [
        dict(model_family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True,
             num_query_groups=2, ffn_hidden_size=176, seq_length=32, padded_vocab_size=256),
        dict(model_family="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
             padded_vocab_size=128),
        dict(model_family="gpt2", num_layers=3, hidden_size=48, num_attention_heads=4, seq_length=16,
             padded_vocab_size=256, untie_embeddings_and_output_weights=True, normalization="RMSNorm"),
        # Qwen2's layout: no linear biases but QKV's (--disable-bias-linear --add-qkv-bias)
        dict(model_family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True,
             num_query_groups=2, ffn_hidden_size=176, seq_length=32, padded_vocab_size=256, add_qkv_bias=True),
        # --qk-layernorm: per-head query and key norms (RMSNorm: a weight; LayerNorm: weight and bias)
        dict(model_family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True,
             num_query_groups=2, ffn_hidden_size=176, seq_length=32, padded_vocab_size=256, qk_layernorm=True),
        dict(model_family="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
             padded_vocab_size=128, qk_layernorm=True),
    ]
    r = subprocess.run([sys.executable, "-c", f"SPECS = {json.dumps(json.dumps(specs))}\n" + code],
                       cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pairs = json.loads(r.stdout.split("RESULT", 1)[1])
    assert pairs[0][0] == 125248 and pairs[1][0] == 110336
    assert pairs[3][0] == 125248 + 2 * (4 + 2 * 2) * 16  # + a QKV bias of (heads + 2 groups) x head size per layer
    assert pairs[4][0] == 125248 + 2 * 2 * 16 and pairs[5][0] == 110336 + 2 * 2 * 2 * 16  # head size 16
    for built, counted in pairs:
        assert built == counted


def test_parameters_per_pipeline_rank_by_hand():
    llama = count_parameters(small_llama(num_layers=4).model)
    # TP2 PP2: a layer keeps its 2 norms (128) whole and splits the rest: 46080/2 + 128 = 23168; 2 layers per stage
    assert parameters_on_pipeline_rank(llama, 2, 2, 0) == 2 * 23168 + 16384 // 2 == 54528
    assert parameters_on_pipeline_rank(llama, 2, 2, 1) == 2 * 23168 + 64 + 16384 // 2 == 54592
    gpt2 = count_parameters(small_gpt2().model)
    # tied embeddings at PP2: the last stage holds a copy of the word embedding
    assert parameters_on_pipeline_rank(gpt2, 1, 2, 0) == 49984 + 8192 + 2048
    assert parameters_on_pipeline_rank(gpt2, 1, 2, 1) == 49984 + 128 + 8192
    assert parameters_on_pipeline_rank(gpt2, 1, 1, 0) == 110336


# ---- memory --------------------------------------------------------------------------------------

def test_memory_per_gpu_by_hand():
    """TP2 PP2 DP2, bf16, distributed Adam, sequence parallel, 4 layers, micro batch 2 of 32 tokens."""
    cfg = small_llama(num_layers=4)
    # bytes per parameter: bf16 weight 2 + fp32 grad 4 + (fp32 main 4 + Adam 8) / DP 2 = 12
    # activations per layer, sbh = 32*2*64 = 4096, 5as/h = 5*4*32/64 = 10, t = 2:
    #   none 4096*(34+10)/2 = 90112, selective 4096*34/2 = 69632, full 2*4096/2 = 4096
    # 8 samples / (2 x DP2) = 2 micro batches: pipeline rank 0 holds 2 in flight, rank 1 holds 1
    per_layer = {"none": 90112, "selective": 69632, "full": 4096}
    for r, act in per_layer.items():
        est = estimate_memory(cfg, tp=2, pp=2, dp=2, recompute=r)
        rank0 = 54528 * 12 + act * 2 * 2
        rank1 = 54592 * 12 + act * 2 * 1
        assert est.pipeline_rank == 0 and rank0 > rank1
        assert est.parameters == 54528
        assert (est.weights, est.grads, est.optimizer) == (54528 * 2, 54528 * 4, 54528 * 6)
        assert est.activations[r] == act * 2 * 2
        assert est.total == rank0
    assert estimate_memory(cfg, 2, 2, 2, "none").total == 1014784
    # TP2 without sequence parallelism: sbh (10 + 24/t + 5as/(ht)) = 4096*(10+12+5); selective 4096*22; full 2sbh
    cfg_nosp = small_llama(num_layers=4, sequence_parallel=False)
    acts = estimate_memory(cfg_nosp, 2, 2, 2, "none").activations
    assert acts == {"none": 4096 * 27 * 4, "selective": 4096 * 22 * 4, "full": 8192 * 4}
    # Megatron's full-recompute methods, 2 layers per pipeline stage, 2 micro batches in flight on rank 0:
    # uniform N=2 keeps one input per 2-layer chunk; block N=1 recomputes 1 layer and keeps all of the other
    assert estimate_memory(cfg, 2, 2, 2, Recompute("full", "uniform", 2)).activations["full"] == 4096 * 1 * 2
    assert estimate_memory(cfg, 2, 2, 2, Recompute("full", "uniform", 1)).activations["full"] == 4096 * 2 * 2
    assert estimate_memory(cfg, 2, 2, 2, Recompute("full", "block", 1)).activations["full"] == (4096 + 90112) * 2
    # fp32, optimizer not distributed, TP1 PP1 DP1: 4 + 4 + 8 bytes per parameter; fp32 activations x2
    cfg32 = small_llama(bf16=False, use_distributed_optimizer=False, global_batch_size=2)
    est = estimate_memory(cfg32, 1, 1, 1, "none")
    assert est.total == 125248 * 16 + 4096 * 44 * 2 * 2 == 2724864



def test_muon_optimizer_state_keeps_adam_on_embeddings_and_norms_by_hand():
    """--optimizer muon, bf16, TP1 PP1 DP1 (Muon refuses the distributed optimizer): Muon's one momentum
    on the 2-D hidden weights, Adam's two on the word embedding, the untied output layer and the norms
    (megatron's Muon chain), each with an fp32 main copy. Small llama, 2 layers, hand count above:
    2-D hidden 2 x (8192 + 4096 + 22528 + 11264) = 92160; Adam: 2 x 256 x 64 = 32768 + 2 x 2 x 64 norms + 64."""
    cfg = small_llama(optimizer="muon", use_distributed_optimizer=False)
    hidden, adam = 2 * (8192 + 4096 + 22528 + 11264), 2 * 256 * 64 + 2 * 2 * 64 + 64
    est = estimate_memory(cfg, tp=1, pp=1, dp=1)
    assert est.parameters == hidden + adam
    assert est.optimizer == hidden * (4 + 4) + adam * (4 + 8)
    # dist_muon over DP 2: the same state, halved; TP2 PP2 rank 0: 1 layer of 2-D weights / 2, embedding / 2, 2 norms
    cfg = small_llama(optimizer="dist_muon", use_distributed_optimizer=False)
    assert estimate_memory(cfg, tp=1, pp=1, dp=2).optimizer == (hidden * 8 + adam * 12) / 2
    rank0_adam, rank0_hidden = 256 * 64 // 2 + 2 * 64, (8192 + 4096 + 22528 + 11264) // 2
    rank1_adam = 256 * 64 // 2 + 2 * 64 + 64
    rank0 = estimate_memory(small_llama(optimizer="muon", use_distributed_optimizer=False), 2, 2, 1)
    assert rank0.pipeline_rank in (0, 1)
    adam_on = rank0_adam if rank0.pipeline_rank == 0 else rank1_adam
    assert rank0.optimizer == rank0_hidden * 8 + adam_on * 12


def test_interleaved_pipeline_activation_memory_by_hand():
    """Interleaved 1F1B: rank 0 holds (1 + (p-1)/(p v)) times 1F1B's activations (Korthikanti et al.
    2022, section 4.2.3) when there are enough micro batches; fewer micro batches cap it."""
    per_layer_none = 90112  # TP2 with sequence parallelism, as in test_memory_per_gpu_by_hand
    # 8 layers over PP 2, 2 virtual stages of 2 layers; DP 1, 16 samples / micro batch 2 = 8 micro batches
    cfg = small_llama(num_layers=8, num_layers_per_virtual_pipeline_stage=2, global_batch_size=16)
    plain = small_llama(num_layers=8, global_batch_size=16)
    # 1F1B rank 0: 2 micro batches in flight x 4 layers
    assert estimate_memory(plain, 2, 2, 1, "none").activations["none"] == per_layer_none * 4 * 2
    # interleaved rank 0: (1 + 1/4) x that = 10 layer-micro-batches (5 model-chunk micro batches of 2 layers)
    est = estimate_memory(cfg, 2, 2, 1, "none")
    assert est.pipeline_rank == 0
    assert est.activations["none"] == per_layer_none * 4 * 2 * (1 + 1 / 4) == per_layer_none * 10
    # 4 virtual stages of 1 layer on PP 2: rank 0 (1 + 1/8) x 8 = 9 layer-micro-batches
    cfg4 = small_llama(num_layers=8, num_virtual_stages_per_pipeline_rank=4, global_batch_size=16)
    assert estimate_memory(cfg4, 2, 2, 1, "none").activations["none"] == per_layer_none * 9
    # micro-batch groups of 4 (Megatron's --microbatch-group-size-per-virtual-pipeline-stage): rank 0 runs
    # 2 (PP-1) + (vp-1) 4 = 6 warm-up forwards, holding 7 model-chunk micro batches of 2 layers
    cfg_g4 = small_llama(num_layers=8, num_layers_per_virtual_pipeline_stage=2, global_batch_size=16,
                         microbatch_group_size_per_virtual_pipeline_stage=4)
    assert estimate_memory(cfg_g4, 2, 2, 1, "none").activations["none"] == per_layer_none * 14
    # one micro batch (global batch 2): only its 2 model-chunk passes of 2 layers are ever held
    cfg1 = small_llama(num_layers=8, num_layers_per_virtual_pipeline_stage=2, global_batch_size=2)
    assert estimate_memory(cfg1, 2, 2, 1, "none").activations["none"] == per_layer_none * 4

# ---- throughput ------------------------------------------------------------------------------------

def test_tokens_per_second_and_days_by_hand():
    # Megatron's FLOPs per token for the 2-layer llama: 6 x (matmul parameters 2*(8192+4096+22528+11264)
    # + logits 256*64) + attention scores and values 12*L*s*h = 552960 + 98304 + 49152 = 700416
    flops_per_token = 6 * (2 * (8192 + 4096 + 22528 + 11264) + 256 * 64) + 12 * 2 * 32 * 64
    assert flops_per_token == 700416
    cfg = small_llama(train_iters=1000, global_batch_size=16)
    stage = plan_stages(cfg, 8)[0]
    hw = Hardware(gpus=8, gpu_memory_gb=None, mfu=0.5, peak_tflops=100.0)
    p = plan_stage(stage, hw, Recompute("none"), 1, 1)
    assert p.flops_per_token == pytest.approx(700416, rel=1e-12)
    tokens_per_s = 0.5 * 100e12 * 8 / 700416
    assert p.tokens_per_second == pytest.approx(tokens_per_s, rel=1e-12)
    assert stage.tokens == 1000 * 16 * 32
    assert p.days == pytest.approx(512000 / tokens_per_s / 86400, rel=1e-12)


# ---- layout choice -------------------------------------------------------------------------------

def _hand_peak_bytes(L, h, heads, groups, ffn, V, tp, pp, gpus=8, global_batch=16):
    """Independent oracle: bf16, replicated Adam (18 bytes/param), full recompute, SP; llama family."""
    kv = h // heads
    layer_split = h * (heads + 2 * groups) * kv + heads * kv * h + 2 * h * ffn + ffn * h
    layer = layer_split // tp + 2 * h
    act_layer = 2 * 32 * 2 * h // tp          # 2sbh/t, s 32, micro batch 2
    micro = global_batch // (2 * (gpus // (tp * pp)))
    peaks = []
    for r in range(pp):
        n = (L // pp) * layer + (V * h // tp if r == 0 else 0) + (h + V * h // tp if r == pp - 1 else 0)
        peaks.append(n * 18 + act_layer * (L // pp) * min(pp - r, micro))
    return max(peaks)


def test_depth_growth_adds_pipeline_stages_and_width_growth_tensor_shards():
    """Smallest TP, then PP, that fits on 8 GPUs: 4 layers fit one GPU exactly (the budget); 8 layers need
    PP2; 2x width fits no PP at TP1 (the embedding and the 4x larger layers only shrink with TP): TP2 PP4."""
    cfg = small_llama(num_layers=4, padded_vocab_size=1024, use_distributed_optimizer=False, global_batch_size=16)
    cfg.staging.stages = [{"at_iteration": 10, "depth_factor": 2}, {"at_iteration": 20, "width_factor": 2}]
    budget = _hand_peak_bytes(4, 64, 4, 2, 176, 1024, 1, 1)
    hw = Hardware(gpus=8, gpu_memory_gb=(budget + 0.5) / GIB, reserved_memory_gb=0.0)
    stages = plan_stages(cfg, 8)
    chosen = [choose_layout(s, hw, Recompute("full")) for s in stages]
    assert [(c.tp, c.pp, c.dp) for c in chosen] == [(1, 1, 8), (1, 2, 4), (2, 4, 1)]
    shapes = [(8, 64, 4, 2, 176), (8, 128, 8, 4, 352)]
    # the oracle agrees: each chosen layout fits and every earlier candidate (TP, then PP ascending) does not
    assert _hand_peak_bytes(8, 64, 4, 2, 176, 1024, 1, 1) > budget >= _hand_peak_bytes(8, 64, 4, 2, 176, 1024, 1, 2)
    for tp, pp in [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2)]:
        assert _hand_peak_bytes(*shapes[1], 1024, tp, pp) > budget
    assert _hand_peak_bytes(*shapes[1], 1024, 2, 4) <= budget
    for c, (L, h, a, g, f) in zip(chosen[1:], shapes):
        assert c.memory.total == _hand_peak_bytes(L, h, a, g, f, 1024, c.tp, c.pp)
    # the printed plan names the change: depth growth +PP2, width growth +TP2 (and PP x2 more)
    text, _ = cluster_report(stages, hw, Recompute("full"))
    rows = {line.split()[0]: line.split() for line in text[text.index("layout per stage"):].splitlines()[2:5]}
    assert rows["1"][1:5] == ["1", "2", "4", "+PP2"] and rows["2"][1:6] == ["2", "4", "1", "+PP2", "+TP2"]


# ---- recipes and stages ------------------------------------------------------------------------

def test_recipe_strings_become_yaml_stages():
    assert parse_recipe("depth:2,depth:2", 300) == [{"depth_factor": 2, "at_iteration": 100},
                                                    {"depth_factor": 2, "at_iteration": 200}]
    assert parse_recipe("layers:16@0.25, width:2+tp:2@50%, depth:2+depth_init:copy@900", 1000) == [
        {"num_layers": 16, "at_iteration": 250},
        {"width_factor": 2, "target_tensor_model_parallel_size": 2, "at_iteration": 500},
        {"depth_factor": 2, "depth_init": "copy", "at_iteration": 900}]
    from megatron_staged.errors import UserError
    for bad in ("depth", "depth:2@1.5", "", "depth:2@soon", "depth:2+at_flops:1e20@100"):
        with pytest.raises(UserError):
            parse_recipe(bad, 100)


def test_stage_configs_follow_the_growth_code():
    cfg = small_llama(num_layers=8, train_iters=100)
    cfg.staging.stages = [{"at_iteration": 30, "depth_factor": 2},
                          {"at_iteration": 60, "width_factor": 2, "target_tensor_model_parallel_size": 2}]
    s = plan_stages(cfg, 4)
    assert [(x.start_iteration, x.end_iteration) for x in s] == [(0, 30), (30, 60), (60, 100)]
    m = [x.cfg.model for x in s]
    assert [(x.num_layers, x.hidden_size, x.num_attention_heads, x.num_query_groups, x.ffn_hidden_size)
            for x in m] == [(8, 64, 4, 2, 176), (16, 64, 4, 2, 176), (16, 128, 8, 4, 352)]
    assert s[2].cfg.parallel.tensor_model_parallel_size == 2
    assert s[1].tokens == 30 * 8 * 32


def test_stage_start_from_flops_and_assumed_slope_trigger():
    cfg = small_llama(train_iters=100, global_batch_size=16)
    per_iteration = 700416 * 16 * 32  # Megatron FLOPs per token (by hand above) x tokens per iteration
    cfg.staging.stages = [{"at_flops": 10 * per_iteration + 1, "depth_factor": 2},   # reached after 11 iterations
                          {"trigger": "slope", "width_factor": 2},                    # assumed halfway: (11+50)//2
                          {"at_iteration": 50, "depth_factor": 2}]
    s = plan_stages(cfg, 8)
    assert [(x.start_iteration, x.end_iteration) for x in s] == [(0, 11), (11, 30), (30, 50), (50, 100)]
    assert [x.when for x in s] == ["", "at_flops", "slope (assumed)", "at_iteration"]
    assert parse_recipe("depth:2@slope,width:2+at_flops:1e20", 100) == [
        {"depth_factor": 2, "trigger": "slope"}, {"width_factor": 2, "at_flops": 1e20}]


def test_stage_whose_point_has_passed_starts_with_the_stage_before():
    # FLOPs per token of the L-layer llama (by hand above): 6 x (46080 L + 256*64) + 12 L 32 64 = 301056 L + 98304
    tokens = 16 * 32
    per_iteration = {L: (301056 * L + 98304) * tokens for L in (2, 4, 8)}
    cfg = small_llama(train_iters=100, global_batch_size=16)
    cfg.staging.stages = [{"at_flops": 10 * per_iteration[2] + 1, "depth_factor": 2},  # after 11 iterations
                          {"at_iteration": 5, "depth_factor": 2},     # passed by then: right after, at 11
                          # 11 iterations of 2 layers, then 2.5 of 8 layers: reached after iteration 14
                          {"at_flops": 11 * per_iteration[2] + 2.5 * per_iteration[8], "width_factor": 2}]
    s = plan_stages(cfg, 8)
    assert [(x.start_iteration, x.end_iteration) for x in s] == [(0, 11), (11, 11), (11, 14), (14, 100)]


# ---- the commands ----------------------------------------------------------------------------

def test_plan_command_prints_every_stage(capsys):
    rc = cli_main(["plan", "--model-family", "llama", "--num-layers", "8", "--hidden-size", "4096",
                   "--ffn-hidden-size", "11008", "--num-attention-heads", "32", "--group-query-attention",
                   "--num-query-groups", "8", "--seq-length", "4096", "--padded-vocab-size", "32000", "--bf16",
                   "--use-distributed-optimizer", "--micro-batch-size", "1", "--global-batch-size", "1024",
                   "--stages", "depth:2,depth:2", "--train-tokens", "210e9", "--gpus", "64",
                   "--recompute-granularity", "selective"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train_iters" not in out and "50068 iterations" in out  # ceil(210e9 / (1024 * 4096))
    for layers in ("8", "16", "32"):
        assert any(line.split()[5:6] == [layers] for line in out.splitlines() if line[:1].isdigit())
    assert "fits" in out and "days" in out


def test_plan_prints_a_tiny_models_flops_per_token(capsys):
    """The small llama's FLOPs per token by hand (above): 301056 L + 98304, i.e. 0.0007 GFLOP at 2 layers
    and 0.0013 at 4 -- printed with two significant digits, not as 0.00."""
    rc = cli_main(["plan", "--model-family", "llama", "--num-layers", "2", "--hidden-size", "64",
                   "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
                   "--ffn-hidden-size", "176", "--seq-length", "32", "--padded-vocab-size", "256",
                   "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "100", "--gpus", "1",
                   "--stages", "depth:2@50"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out[out.index("GFLOP/token"):].splitlines()
    got = [float(table[k].split()[1]) for k in (1, 2)]
    want = [float(f"{(301056 * L + 98304) / 1e9:.2g}") for L in (2, 4)]
    assert got == want and want == [0.0007, 0.0013], (got, want)


def test_plan_refuses_what_fits_nowhere(capsys):
    rc = cli_main(["plan", "--model-family", "llama", "--num-layers", "8", "--hidden-size", "4096",
                   "--num-attention-heads", "32", "--seq-length", "4096", "--padded-vocab-size", "32000",
                   "--bf16", "--gpus", "1", "--gpu-memory-gb", "16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stage 0") and "--recompute-granularity selective" in err and err.count("\n") == 1


def test_plan_searches_when_the_configured_layout_cannot_run(capsys):
    """6 GPUs, global batch 256 of micro batches of 4: TP1 PP1 leaves DP 6, which does not divide 256 / 4;
    TP1 PP2 leaves DP 3 (no either); TP1 PP3 leaves DP 2 (yes) -- the first candidate that can run."""
    rc = cli_main(["plan", "--model-family", "llama", "--num-layers", "6", "--hidden-size", "256",
                   "--num-attention-heads", "8", "--seq-length", "256", "--padded-vocab-size", "1024", "--bf16",
                   "--micro-batch-size", "4", "--global-batch-size", "256", "--train-iters", "100", "--gpus", "6"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "note: the configured layout TP1 PP1 cannot run on 6 GPUs (--global-batch-size 256 is not divisible" in out
    assert "planning from TP1 PP3" in out
    row = next(l for l in out.splitlines() if l.startswith("0 ") and l.rstrip().endswith("TP1 PP3"))
    assert row.split()[:4] == ["0", "1", "3", "2"]  # stage 0 at TP1 PP3 DP2


def test_plan_falls_back_to_another_layout_only_when_that_one_plans(capsys):
    """A bad stage (width_factor 3) fails at every layout: the error is the stage's, with no note that
    claims planning goes on from another layout -- neither when the configured TP1 PP1 cannot run on
    6 GPUs (256 / (4 x 6) is no integer; TP1 PP3 could) nor when it can (8 GPUs: 256 / (4 x 8) = 8)."""
    for gpus in ("6", "8"):
        rc = cli_main(["plan", "--model-family", "llama", "--num-layers", "6", "--hidden-size", "256",
                       "--num-attention-heads", "8", "--seq-length", "256", "--padded-vocab-size", "1024", "--bf16",
                       "--micro-batch-size", "4", "--global-batch-size", "256", "--train-iters", "100",
                       "--gpus", gpus, "--stages", "width:3"])
        cap = capsys.readouterr()
        assert rc == 2 and "note:" not in cap.out, cap.out
        assert cap.err.startswith("error: staging.stages[0].width_factor: 3") and cap.err.count("\n") == 1, cap.err


@pytest.mark.parametrize("command", [["plan"], ["train", "--dry-run"]])
def test_plan_and_dry_run_name_the_flag_that_leaves_nothing(capsys, command):
    """--train-samples 100 < one global batch of 256 trains 100 // 256 = 0 iterations: the error names
    --train-samples, not an --train-iters the user never gave; 24 GiB reserved of 24 leaves no memory."""
    base = command + ["--model-family", "llama", "--num-layers", "2", "--hidden-size", "64",
                      "--num-attention-heads", "4", "--seq-length", "32", "--padded-vocab-size", "256",
                      "--micro-batch-size", "4", "--global-batch-size", "256", "--gpus", "8"]
    assert cli_main(base + ["--train-samples", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --train-samples 100 is less than one global batch") and "--train-iters" not in err
    assert cli_main(base + ["--train-iters", "10", "--gpu-memory-gb", "24", "--reserved-memory-gb", "24"]) == 2
    assert capsys.readouterr().err == "error: --reserved-memory-gb 24 leaves nothing of --gpu-memory-gb 24\n"


def test_layout_change_that_is_no_whole_factor_is_printed_as_from_to(capsys):
    """TP2 PP2 (DP 20/4 = 5) -> TP1 PP5 (DP 20/5 = 4): PP grows by 2.5 and TP shrinks; the change column
    said '+PP2' (5 // 2) and nothing of TP."""
    rc = cli_main(["train", "--dry-run", "--model-family", "llama", "--num-layers", "4", "--hidden-size", "64",
                   "--num-attention-heads", "4", "--seq-length", "32", "--padded-vocab-size", "256",
                   "--micro-batch-size", "1", "--global-batch-size", "20", "--train-iters", "10", "--world-size", "20",
                   "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                   "--stages", "layers:10+pp:5+tp:1@5"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out[out.index("configured layout per stage"):].splitlines()
    row = next(line.split() for line in table if line.startswith("1 "))
    assert row[1:6] == ["1", "5", "4", "PP2->5", "TP2->1"], row


def test_train_tokens_and_train_iters_flags_conflict(capsys, tmp_path):
    """--train-iters 10 with --train-tokens 1e6 planned ceil(1e6 / (256 x 32)) = 123 iterations, dropping
    the given 10 without a word; a YAML's train_iters is still overridden (123 iterations)."""
    base = ["plan", "--model-family", "llama", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
            "4", "--seq-length", "32", "--padded-vocab-size", "256", "--micro-batch-size", "4",
            "--global-batch-size", "256", "--gpus", "8", "--train-tokens", "1e6"]
    assert cli_main(base + ["--train-iters", "10"]) == 2
    assert capsys.readouterr().err == "error: give one of --train-tokens and --train-iters\n"
    (tmp_path / "run.yaml").write_text("training:\n  train_iters: 7\n")
    assert cli_main(base + ["--config", str(tmp_path / "run.yaml")]) == 0
    assert f"{-(-10**6 // (256 * 32))} iterations" in capsys.readouterr().out


def test_dry_run_warns_about_outputs_the_run_would_refuse(capsys, tmp_path):
    """Found as a new user: --dry-run said the config was valid with --save pointing at a file and
    --log-file under one; train then refused at once. A dry run may be made on another machine, so
    these are warnings (rc 0), each the sentence train's preflight would stop with."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    flags = ["train", "--dry-run", "--world-size", "8", "--num-layers", "4", "--hidden-size", "64",
             "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "8",
             "--mock-data", "--train-iters", "10"]
    assert cli_main([*flags, "--save", str(a_file), "--log-file", str(a_file / "log.jsonl")]) == 0
    out = capsys.readouterr().out
    assert f"warning: train would refuse to start: --save {a_file} is a file; give a directory" in out
    assert f"warning: train would refuse to start: --log-file {a_file / 'log.jsonl'}: {a_file} is a file" in out
    assert cli_main([*flags, "--save", str(tmp_path / "new_dir"), "--log-file", str(tmp_path / "log.jsonl")]) == 0
    assert "would refuse" not in capsys.readouterr().out


def test_quickstart_is_its_example_config_and_ends_its_decay_with_the_run():
    """The built-in quickstart (the README's first command) and examples/quickstart.yaml are one config,
    and it gives the user no schedule warning: found in this session, the schedule-lag warning's fix
    reached the example file only, and the quickstart told its user to change a config they never wrote.
    By hand: growths at 100 (rho 1.4) and 200 (rho 1.8) set the schedule to round(100/1.4) = 71, then
    round((71 + 100)/1.8) = 95; at iteration 300 it is at step 95 + 100 = 195 = lr_decay_iters."""
    import yaml

    from megatron_staged.config import config_from_args, resolve_model, validate
    from megatron_staged.planning.recipe import schedule_warnings
    from megatron_staged.quickstart import QUICKSTART_YAML

    assert yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text()) == yaml.safe_load(QUICKSTART_YAML)
    cfg = Config()
    apply_mapping(cfg, yaml.safe_load(QUICKSTART_YAML), source="quickstart")
    cfg.data.builtin_corpus, cfg.data.mock_data = False, True
    assert cfg.optim.lr_decay_iters == round((round(100 / 1.4) + 100) / 1.8) + 100 == 195
    resolve_model(cfg.model)
    cfg.model.padded_vocab_size = 512
    validate(cfg, 4)
    assert schedule_warnings(cfg, 4) == []
    cfg.optim.lr_decay_iters = None  # the decay span is then --train-iters: the warning is live
    assert any("--lr-decay-iters 195" in w for w in schedule_warnings(cfg, 4))


def test_every_example_config_dry_runs(capsys):
    configs = sorted(os.path.relpath(p, EXAMPLES) for p in glob.glob(str(EXAMPLES / "**" / "*.yaml"), recursive=True))
    assert configs == sorted(EXAMPLE_WORLD), "list every example config's world size in EXAMPLE_WORLD"
    for rel in configs:
        rc = cli_main(["train", "--dry-run", "--config", str(EXAMPLES / rel), "--world-size", str(EXAMPLE_WORLD[rel]),
                       "--gpu-memory-gb", "80", *EXAMPLE_FLAGS.get(rel, [])])
        out = capsys.readouterr().out
        assert rc == 0, rel
        assert "the config is valid" in out and "fits" in out
        assert "exceed" not in out, f"{rel}: a stage does not fit 80 GiB at its configured layout"
        assert "LR schedule back" not in out, f"{rel}: the growths leave its LR decay unfinished"
    # the 7B example's stages: 8 -> 16 -> 32 layers of hidden 4096
    rc = cli_main(["train", "--dry-run", "--config", str(EXAMPLES / "llama_7b_progressive_depth/llama_7b.yaml"),
                   "--world-size", "64", "--vocab-size", "32000"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and "4096" in line]
    assert [r[5] for r in rows[:3]] == ["8", "16", "32"]


def test_example_shell_scripts_parse():
    scripts = glob.glob(str(EXAMPLES / "**" / "*.sh"), recursive=True) + \
        glob.glob(str(EXAMPLES / "**" / "*.sbatch"), recursive=True)
    assert len(scripts) >= 3
    for s in scripts:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"


def test_dry_run_builds_nothing_and_rejects_bad_configs():
    """One process, no torchrun: no megatron-core model, no process group; bad stages fail in one line."""
    code = r"""
import sys
from megatron_staged.cli import main
rc = main(["train", "--dry-run", "--config", "examples/llama_7b_progressive_depth/llama_7b.yaml",
           "--world-size", "64", "--vocab-size", "32000"])
import torch.distributed as dist
print("RESULT", rc, "megatron_staged.model.builder" in sys.modules, dist.is_initialized())  # nothing that builds a model
bad = [["--world-size", "60"], ["--train-iters", "5000"], ["--world-size", "64", "--global-batch-size", "1000"]]
for extra in bad:
    print("BAD", main(["train", "--dry-run", "--config", "examples/llama_7b_progressive_depth/llama_7b.yaml",
                       "--vocab-size", "32000", "--world-size", "64", *extra]))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RESULT 0 False False" in r.stdout
    assert r.stdout.count("BAD 2") == 3
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "not divisible by TP x PP" in errors[0] or "60" in errors[0]
    assert "staging.stages[0].at_iteration 6000" in errors[1] and "would never run" in errors[1]
    assert "--global-batch-size 1000" in errors[2]


def test_example_readme_holds_the_current_plan(capsys):
    """The plan committed in the 7B example's README is what `plan` prints today (docs do not rot)."""
    readme = (EXAMPLES / "llama_7b_progressive_depth" / "README.md").read_text()
    section = readme[readme.index("## Plan for 64"):]
    committed = section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]
    rc = cli_main(["plan", "--config", str(EXAMPLES / "llama_7b_progressive_depth/llama_7b.yaml"), "--gpus", "64",
                   "--gpu-memory-gb", "80", "--vocab-size", "32000", "--recompute-granularity", "selective"])
    assert rc == 0
    assert capsys.readouterr().out.rstrip("\n") == committed


def test_zero_one_layer_examples_hold_their_current_plan_and_dry_run(capsys):
    """The zero/one-layer 7B recipes start at 0 or 1 layer (PP1) and expand once to full depth at
    0.8 T at another layout; their committed `plan` and `train --dry-run` outputs are today's."""
    for rel in ZERO_ONE:
        base = EXAMPLES / rel[:-len(".yaml")]
        for out_file, argv in (
                (".plan.txt", ["plan", "--config", str(EXAMPLES / rel), "--gpus", "64", "--gpu-memory-gb", "80"]),
                (".dry_run.txt", ["train", "--dry-run", "--config", str(EXAMPLES / rel), "--world-size", "64",
                                  "--gpu-memory-gb", "80"])):
            assert cli_main(argv + EXAMPLE_FLAGS[rel]) == 0
            out = capsys.readouterr().out
            assert out == base.with_name(base.name + out_file).read_text(), f"{rel}{out_file}: regenerate it"
        rows = [line.split() for line in out.splitlines() if line[:1] in "01" and ("initial" in line or "layers:" in line)]
        full = 60 if "gpt2" in rel else 32
        assert [r[5] for r in rows[:2]] == ["0" if "from_0" in rel else "1", str(full)], rows
        assert rows[1][2] == "at_fraction" and rows[1][3].startswith(str(int(0.8 * int(rows[1][3].split("-")[1]))))
        assert "warning" not in out  # the expansion sits in WSD's stable phase


# ---- kaplan mode: the schedule and saving from Kaplan's L(N, S) -----------------------------------

def _kaplan_by_hand(layers, hidden, shapes_and_thresholds, rho=None):
    """Independent of planning/kaplan.py: slopes by numerical differentiation of log L against
    log C = log(6 N B S), crossing points and loss matches by bisection."""
    import math

    def loss(n, s):
        return (8.8e13 / n) ** 0.076 + (2.1e3 / s) ** 0.76

    def slope(n, s, h=1e-5):  # d log10 L / d log10 C along one model's curve (C = 6 N B S)
        return (math.log10(loss(n, s * 10 ** h)) - math.log10(loss(n, s * 10 ** -h))) / (2 * h)

    def bisect(f, lo, hi):  # f(lo) < 0 < f(hi), in log space
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return math.sqrt(lo * hi)

    n_target = 12 * layers * hidden ** 2
    s_opt = bisect(lambda s: slope(n_target, s) - (-0.052), 1e-3, 1e12)
    rows, prev_end, prev_loss = [], None, None
    for k, (L, d, thr) in enumerate(shapes_and_thresholds):
        n = 12 * L * d * d
        start = 0.0 if k == 0 else (prev_end / rho if rho else bisect(lambda s: prev_loss - loss(n, s), 1e-3, 1e12))
        end = s_opt if thr is None else max(start, bisect(lambda s: slope(n, s) - thr, 1e-3, 1e12))
        rows.append((n, start, end))
        prev_end, prev_loss = end, loss(n, end)
    staged = sum(n * (e - s) for n, s, e in rows)
    return rows, s_opt, 1 - staged / (n_target * s_opt)


@pytest.mark.parametrize("recipe,shapes,rho", [
    ("2xD", [(2, 128, -0.0575), (4, 128, None)], None),
    ("2xW", [(4, 64, -0.0475), (4, 128, None)], None),
    ("2x2xD", [(1, 128, -0.0575), (2, 128, -0.0575), (4, 128, None)], None),
    ("2xDxW", [(2, 64, -0.03), (4, 128, None)], None),
    ("2xD", [(2, 128, -0.0575), (4, 128, None)], 1.4),
])
def test_kaplan_plan_equals_hand_computed_schedule(recipe, shapes, rho):
    from megatron_staged.planning.kaplan import parse_growths, plan_kaplan

    rows, s_opt, saving = _kaplan_by_hand(4, 128, shapes, rho)
    plan = plan_kaplan(4, 128, parse_growths(recipe), train_iters=1000, tokens_per_iteration=16 * 128, rho=rho)
    assert [(st.num_layers, st.hidden_size) for st in plan.stages] == [(L, d) for L, d, _ in shapes]
    for st, (n, start, end) in zip(plan.stages, rows):
        assert st.params == n
        assert st.kaplan_start == pytest.approx(start, rel=1e-6) and st.kaplan_end == pytest.approx(end, rel=1e-6)
    for prev, st in zip(rows, plan.stages[1:]):
        assert st.rho == pytest.approx(prev[2] / rows[st.index][1], rel=1e-6)
    assert plan.kaplan_opt == pytest.approx(s_opt, rel=1e-6)
    assert plan.saving == pytest.approx(saving, abs=1e-6)
    # iterations: the staged schedule fills the 1000-iteration budget in proportion to Kaplan steps
    total = sum(e - s for _, s, e in rows)
    bounds = [0.0]
    for _, s, e in rows:
        bounds.append(bounds[-1] + e - s)
    assert [st.start_iteration for st in plan.stages] == [round(1000 * b / total) for b in bounds[:-1]]
    assert plan.stages[-1].end_iteration == 1000
    assert plan.staged_flops == pytest.approx(sum(6 * n * 2048 * (e - s) * 1000 / total for n, s, e in rows))
    assert plan.yaml_stages()[0]["at_iteration"] == plan.stages[1].start_iteration
    # the printed stages carry the schedule's rho, so a run of them jumps its LR schedule by the same ratio
    # (found as a new user: they had none, and the trainer used its default 1.4 / 1.8)
    assert [y["rho"] for y in plan.yaml_stages()] == [round(prev[2] / rows[i + 1][1], 4)
                                                        for i, prev in enumerate(rows[:-1])]


def test_kaplan_one_growth_saving_is_the_papers_formula_and_the_command_prints_it(capsys):
    """One growth: saving = [C_large(S_target) - C_small(S_pre)] / C_large(S_opt) (REFERENCE.md 1)."""
    from megatron_staged.planning.kaplan import parse_growths, plan_kaplan

    plan = plan_kaplan(4, 128, parse_growths("2xD"), 1000, 2048)
    small, large = plan.stages
    by_formula = (large.params * large.kaplan_start - small.params * small.kaplan_end) / (large.params * plan.kaplan_opt)
    assert plan.saving == pytest.approx(by_formula, rel=1e-9)
    assert cli_main(["plan", "--mode", "kaplan", "--stages", "2xD", "--num-layers", "4", "--hidden-size", "128",
                     "--num-attention-heads", "4", "--seq-length", "128", "--global-batch-size", "16",
                     "--train-iters", "1000"]) == 0
    out = capsys.readouterr().out
    assert f"predicted saving {100 * plan.saving:.1f}%" in out and f"{small.kaplan_end:.0f}" in out
    assert parse_growths("2x2xD") == [{"depth_factor": 2}] * 2
    assert parse_growths("2xDxW") == [{"depth_factor": 2, "width_factor": 2}]
    assert parse_recipe("2xD,2xW", 900) == [{"depth_factor": 2, "at_iteration": 300},
                                            {"width_factor": 2, "at_iteration": 600}]


def test_recipe_is_placed_on_a_train_samples_run(capsys):
    # --train-samples 102400 at global batch 512: 200 iterations (not the --train-iters default, 100)
    flags = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--padded-vocab-size", "256", "--micro-batch-size", "8", "--global-batch-size", "512",
             "--train-samples", "102400"]
    assert cli_main(["plan", *flags, "--stages", "depth:2,width:2@75%", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and ("initial" in line or "at_" in line)]
    assert [r[3] for r in rows] == ["0-66", "66-150", "150-200"], out  # evenly spaced: (n+1) 200 // 3; 75% of 200
    assert cli_main(["plan", "--mode", "kaplan", *flags, "--stages", "2xD"]) == 0
    assert "over 200 iterations" in capsys.readouterr().out


def test_unreached_at_flops_stage_is_a_note_not_an_error(capsys):
    """The trainer runs a config whose at_flops lies beyond the run (and says at the end that the stage
    never ran), so plan and --dry-run do not refuse it: they plan the stages before it and say so."""
    # 4 layers: 301056 L + 98304 = 1302528 FLOPs per token (see above), 16 x 32 tokens per iteration
    per_iteration = 1302528 * 16 * 32
    cfg = small_llama(num_layers=4, train_iters=100, global_batch_size=16)
    cfg.staging.stages = [{"at_iteration": 10, "width_factor": 2},
                          {"at_flops": 1e30, "depth_factor": 2}, {"at_iteration": 90, "depth_factor": 2}]
    notes = []
    s = plan_stages(cfg, 8, notes)
    assert [(x.start_iteration, x.end_iteration) for x in s] == [(0, 10), (10, 100)]
    assert len(notes) == 1 and "staging.stages[1] at_flops 1e+30" in notes[0] and "staging.stages[2:]" in notes[0]
    cfg.staging.stages = [{"at_flops": 99.5 * per_iteration, "depth_factor": 2}]  # reached after iteration 100
    notes = []
    assert [(x.start_iteration, x.end_iteration) for x in plan_stages(cfg, 8, notes)] == [(0, 100)]
    assert "would be reached at iteration 100, not before --train-iters 100" in notes[0]
    cfg.staging.stages = [{"at_flops": 98.5 * per_iteration, "depth_factor": 2}]  # after iteration 99: runs
    assert [(x.start_iteration, x.end_iteration) for x in plan_stages(cfg, 8)] == [(0, 99), (99, 100)]


def _stage_flops(flags: list[str]) -> float:
    """Planned FLOPs of a one-stage run (the dry-run's FLOPs column), in process."""
    from megatron_staged.config import parse_config, validate

    cfg = parse_config(["--mock-data", "--model-family", "llama", "--hidden-size", "64", "--num-attention-heads", "4",
                        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "16", *flags])
    validate(cfg, 1)
    (stage,) = plan_stages(cfg, 1)
    p = plan_stage(stage, Hardware(gpus=1, gpu_memory_gb=None), Recompute(), 1, 1)
    return p.flops_per_token * stage.tokens


def test_planned_flops_count_the_layers_raptr_and_pld_run():
    """Found as a new user: `train --dry-run` / `plan` counted every layer in every iteration of a RaPTr
    or PLD run, while the trainer counts the layers that ran. RaPTr 4,6,8 of 8 layers in three equal
    stages of 33 iterations runs 6 layers on average: the FLOPs of a 6-layer model. PLD: DeepSpeed's
    keep-probabilities summed by brute force over the iterations."""
    import math

    raptr = _stage_flops(["--num-layers", "8", "--train-iters", "99", "--raptr-stages", "4,6,8"])
    assert raptr == pytest.approx(_stage_flops(["--num-layers", "6", "--train-iters", "99"]), rel=1e-12)
    full8 = _stage_flops(["--num-layers", "8", "--train-iters", "99"])
    l0 = _stage_flops(["--num-layers", "0", "--train-iters", "99"])  # the logits term alone
    theta_bar, gamma, L, T = 0.5, 0.03, 8, 99
    layers = sum(1 - (l / L) * (1 - ((1 - theta_bar) * math.exp(-gamma * t) + theta_bar))
                 for t in range(T) for l in range(1, L + 1)) / T
    pld = _stage_flops(["--num-layers", "8", "--train-iters", "99", "--progressive-layer-drop", "--pld-gamma", "0.03"])
    assert pld == pytest.approx(l0 + (full8 - l0) * layers / L, rel=1e-9)


def test_fits_nowhere_names_only_remedies_that_exist():
    """The 'fits no layout' error suggested a smaller micro batch at micro batch 1 and, with full
    recomputation, no recomputation hint is left: only the remedies the run can still take are named."""
    from megatron_staged.errors import UserError

    cfg = small_llama(num_layers=4, padded_vocab_size=1024, global_batch_size=16, micro_batch_size=1)
    stages = plan_stages(cfg, 8)
    hw = Hardware(gpus=8, gpu_memory_gb=1e-4, reserved_memory_gb=0.0)  # 100 KiB: nothing fits
    with pytest.raises(UserError) as e:
        cluster_report(stages, hw, Recompute("full"))
    assert str(e.value).endswith("; use more GPUs")  # micro batch 1, full recomputation: nothing else left
    cfg2 = small_llama(num_layers=4, padded_vocab_size=1024, global_batch_size=16, micro_batch_size=2)
    with pytest.raises(UserError) as e:
        cluster_report(plan_stages(cfg2, 8), hw, Recompute("none"))
    assert str(e.value).endswith("; use more GPUs, a smaller micro batch or --recompute-granularity selective")
