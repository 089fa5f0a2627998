"""vllm.kv_cache_memory_gib=auto: the colocated engine's KV cache sized for one call's sequences."""

import math

import pytest
import torch
from transformers import Qwen2Config

from online_rl.checks import check_kv_cache_setting
from online_rl.engines.vllm_colocate import kv_cache_bytes_for, rollout_kv_cache_bytes
from online_rl.setup import sequences_per_call

from .conftest import compose_config

# Qwen2-0.5B's attention: 24 layers, 2 key/value heads of 64 dimensions (14 query heads over 896)
QWEN2_05B = Qwen2Config(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896)


def test_a_rollout_of_the_bench_at_0_5b_needs_1_4_gib():
    # 128 sequences x 768 tokens (48 blocks of 16) x 24 layers x K,V x 2 heads x 64 x 2 bytes, x 1.25
    expected = 1.25 * 128 * 768 * 24 * 2 * 2 * 64 * 2
    assert rollout_kv_cache_bytes(128, 768, 24, 2, 64, 2) == expected
    assert kv_cache_bytes_for(QWEN2_05B, torch.bfloat16, 128, 768, 1) == expected
    assert expected / 2**30 == pytest.approx(1.406, abs=1e-3)


def test_a_sequence_takes_whole_blocks_of_16_tokens():
    one_block = rollout_kv_cache_bytes(1, 16, 1, 1, 1, 1)
    assert rollout_kv_cache_bytes(1, 17, 1, 1, 1, 1) == 2 * one_block
    assert rollout_kv_cache_bytes(3, 1, 1, 1, 1, 1) == 3 * one_block


def test_tensor_parallel_gpus_each_hold_their_heads_and_float32_doubles_it():
    whole = kv_cache_bytes_for(QWEN2_05B, torch.bfloat16, 8, 100, 1)
    assert kv_cache_bytes_for(QWEN2_05B, torch.bfloat16, 8, 100, 2) == whole / 2
    assert (
        kv_cache_bytes_for(QWEN2_05B, torch.bfloat16, 8, 100, 4) == whole / 2
    )  # 2 heads: one per GPU at least
    assert kv_cache_bytes_for(QWEN2_05B, torch.float32, 8, 100, 1) == 2 * whole


def test_an_explicit_head_dim_wins_and_latent_attention_falls_back_to_vllm():
    qwen3_like = Qwen2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64
    )
    qwen3_like.head_dim = 128  # wider than hidden / heads, as Qwen3's
    assert kv_cache_bytes_for(qwen3_like, torch.bfloat16, 1, 16, 1) == math.ceil(
        1.25 * 16 * 2 * 2 * 2 * 128 * 2
    )
    latent = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    latent.kv_lora_rank = 512  # DeepSeek's multi-latent attention caches a compressed vector instead
    assert kv_cache_bytes_for(latent, torch.bfloat16, 1, 16, 1) is None


def test_one_call_holds_a_rollout_or_an_evaluation_batch_whichever_is_larger():
    cfg = compose_config(["prompts_per_step=16", "algo.num_generations=8", "eval_every=0"])
    from online_rl.algorithms import make_algorithm

    grpo = make_algorithm(cfg.algo, cfg.sampling.max_completion_length, None)
    assert sequences_per_call(cfg, grpo, world_size=1) == 128
    assert sequences_per_call(cfg, grpo, world_size=2) == 64
    cfg.eval_every = 10  # 64 prompts x 4 samples per evaluation call
    assert sequences_per_call(cfg, grpo, world_size=1) == 256
    xpo_cfg = compose_config(["algo=xpo", "prompts_per_step=16", "eval_every=0"])
    xpo = make_algorithm(xpo_cfg.algo, xpo_cfg.sampling.max_completion_length, None)
    assert sequences_per_call(xpo_cfg, xpo, world_size=1) == 16  # the engine draws one of each pair


@pytest.mark.parametrize("value", ["auto", None, 4, 0.5, "4"])
def test_kv_cache_settings_that_work(value):
    check_kv_cache_setting(value)


@pytest.mark.parametrize("value", ["big", 0, -1, True])
def test_a_kv_cache_setting_that_cannot_work_names_the_ones_that_do(value):
    with pytest.raises(ValueError, match=r"vllm.kv_cache_memory_gib=.*auto.*kv_cache_memory_gib=4.*null"):
        check_kv_cache_setting(value)
