"""Several training ranks, for real: 2 processes on the CPU over gloo, the tiny model.

Two kinds of test:
- spawned ranks (torch.multiprocessing) that run the helpers of online_rl.distributed on known data and
  compare with the 1-process computation on the same global batch: advantages, reduced metrics, a DDP
  and an FSDP2 optimizer step, the full-weight gather used for the vLLM sync and checkpoints;
- `torchrun --nproc_per_node 2 train.py hardware=cpu2`, as a user launches it: one output directory, one
  metrics.jsonl and one trackio run, curves that follow a 1-process run with the same global batch, and
  FSDP2 steps equal to DDP steps.

FSDP2 (torch.distributed.fsdp.fully_shard) runs on CPUs with gloo in torch 2.11, so it is tested here
like DDP; only NCCL and vLLM's external launcher need the GPU tests (tests/test_gpu_multigpu.py).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from online_rl import distributed
from online_rl.algorithms import grpo, rloo

from .conftest import ROOT, compose_config, free_port

WORLD = 2
SMALL = ["data.synthetic_rows=64", "prompts_per_step=4", "algo.num_generations=4", "micro_batch_size=8"]


def _rank_main(rank: int, port: int, fn, out_dir: str, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path, *args) -> list:
    """fn(rank, *args) on 2 gloo ranks; what each returns, in rank order."""
    mp.spawn(_rank_main, args=(free_port(), fn, str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --- group statistics and metrics -----------------------------------------------------------------

G = 4
GLOBAL_REWARDS = torch.tensor(
    [0.0, 1, 1, 0, 2, 2, 2, 2, 0.5, 0, 3, 1, -1, 0, 0, 1]
)  # 4 prompts x G, prompt-major


def _advantages(rank: int):
    local = distributed.my_share(list(GLOBAL_REWARDS))  # this rank's 2 prompts, all of their samples
    rewards = torch.stack(local)
    gathered = distributed.gather_rows(rewards)
    return {
        scale: distributed.my_rows(grpo.group_advantages(gathered, G, scale))
        for scale in ("group", "batch", "none")
    } | {"rloo": distributed.my_rows(rloo.leave_one_out_advantages(gathered, G, True))}


def test_advantages_over_two_ranks_equal_the_one_process_ones(tmp_path):
    """Each rank owns whole groups; batch statistics (scale_rewards=batch, RLOO's normalisation) see
    every rank's rewards, so the ranks' advantages, put together, are the 1-process advantages."""
    ranks = run_ranks(_advantages, tmp_path)
    for key in ("group", "batch", "none"):
        expected = grpo.group_advantages(GLOBAL_REWARDS, G, key)
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), expected)
    torch.testing.assert_close(
        torch.cat([r["rloo"] for r in ranks]), rloo.leave_one_out_advantages(GLOBAL_REWARDS, G, True)
    )
    # batch scaling differs from what a rank alone would compute: the gather matters
    alone = grpo.group_advantages(GLOBAL_REWARDS[:8], G, "batch")
    assert not torch.allclose(ranks[0]["batch"], alone)


# Per-rank data: rewards (samples), a score with a None, completion token counts and a per-token quantity.
RANK_DATA = [
    {
        "rewards": [0.0, 1.0, 1.0, 3.0],
        "score": [1.0, None, 0.0, 1.0],
        "kl_tokens": [0.5] * 10,
        "len": [3, 9, 4, 2],
    },
    {
        "rewards": [2.0, 2.0, 0.0, 5.0],
        "score": [None, None, 1.0, 0.0],
        "kl_tokens": [0.1] * 30,
        "len": [7, 1, 5, 8],
    },
]


def _local_metrics(data) -> dict[str, float]:
    rewards = torch.tensor(data["rewards"])
    given = [s for s in data["score"] if s is not None]
    return {
        "reward/total_mean": float(rewards.mean()),
        "reward/total_std": float(rewards.std()),
        "reward/acc_mean": sum(given) / len(given),
        "reward/acc_none_frac": 1 - len(given) / len(data["score"]),
        "train/kl": sum(data["kl_tokens"]) / len(data["kl_tokens"]),
        "rollout/len_max": float(max(data["len"])),
        "time/step_s": 1.0 + len(data["kl_tokens"]) / 10,
        "perf/completion_tokens_per_s": 100.0,
        "sync/logp_gap_mean": float("nan") if len(data["kl_tokens"]) == 30 else 0.25,
    }


def _reduce(rank: int):
    data = RANK_DATA[rank]
    return distributed.reduce_metrics(
        _local_metrics(data), samples=len(data["rewards"]), tokens=len(data["kl_tokens"]), engine_tokens=10
    )


def test_metrics_are_reduced_once_to_the_whole_rollouts_values(tmp_path):
    """The reduced metrics equal the metrics of the two ranks' data put together (not a mean of means
    where that is wrong: std, a mean over scored samples, a per-token mean, maxima, sums, a NaN)."""
    ranks = run_ranks(_reduce, tmp_path)
    assert ranks[0] == ranks[1]  # every rank holds the same numbers; rank 0 logs them
    together = {key: sum((d[key] for d in RANK_DATA), []) for key in RANK_DATA[0]}
    expected = _local_metrics(together)
    reduced = ranks[0]
    for key in (
        "reward/total_mean",
        "reward/total_std",
        "reward/acc_mean",
        "reward/acc_none_frac",
        "train/kl",
    ):
        assert reduced[key] == pytest.approx(expected[key]), key
    assert reduced["rollout/len_max"] == 9.0
    assert reduced["time/step_s"] == 4.0  # the slowest rank
    assert reduced["perf/completion_tokens_per_s"] == 200.0  # the run's throughput
    assert reduced["sync/logp_gap_mean"] == 0.25  # a rank without a value (NaN) has no say


def _agreement(rank: int, out_dir: str):
    chosen = distributed.from_main(f"{out_dir}/run-of-rank-{rank}")
    written = distributed.on_main(lambda: (open(f"{chosen}.txt", "w").write(str(rank)), chosen)[1])
    return {
        "chosen": chosen,
        "written": written,
        "file_seen_after_barrier": os.path.exists(f"{chosen}.txt"),
        "stop": distributed.any_rank(rank == 1),
        "share": distributed.my_share(list(range(8))),
    }


def test_ranks_agree_on_one_directory_and_rank_zero_writes(tmp_path):
    ranks = run_ranks(_agreement, tmp_path, str(tmp_path))
    assert {r["chosen"] for r in ranks} == {f"{tmp_path}/run-of-rank-0"}
    assert all(r["written"] == ranks[0]["chosen"] and r["file_seen_after_barrier"] for r in ranks)
    assert (tmp_path / "run-of-rank-0.txt").read_text() == "0"  # rank 0 wrote it, nobody else
    assert all(r["stop"] for r in ranks)  # a stop request on rank 1 stops both
    assert [r["share"] for r in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# --- one optimizer step: DDP and FSDP2 against one process ----------------------------------------


def _batch(model_dir):
    """A fixed rollout of 8 completions of different lengths, with advantages."""
    from transformers import AutoTokenizer

    from online_rl.logprobs import pack

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (4 + i % 3,), generator=generator).tolist() for i in range(8)]
    completions = [torch.randint(3, 200, (2 + (3 * i) % 7,), generator=generator).tolist() for i in range(8)]
    advantages = torch.linspace(-1.5, 1.5, 8)
    return prompts, completions, advantages, tokenizer.pad_token_id, pack


def _dapo_step(policy, prompts, completions, advantages, pad_id, pack, rollout_tokens: float):
    from online_rl.logprobs import completion_logprobs

    batch = pack(prompts, completions, pad_id)
    logp, _ = completion_logprobs(policy, batch, 1.0)
    token_loss, _ = grpo.clipped_token_loss(logp, logp.detach(), advantages, 0.2, 0.2)
    loss = grpo.aggregate_loss(token_loss, batch.completion_mask, "dapo", 1, rollout_tokens, 8)
    loss.backward()
    return int(batch.completion_mask.sum())


def _train_step(rank: int, model_dir: str, strategy: str):
    from transformers import AutoModelForCausalLM

    prompts, completions, advantages, pad_id, pack = _batch(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ranks = distributed.Ranks(rank, WORLD, rank, torch.device("cpu"))
    policy = distributed.wrap_policy(model, strategy, ranks)
    share = slice(rank * 4, rank * 4 + 4)
    local_tokens = sum(len(c) for c in completions[share])
    _dapo_step(
        policy,
        prompts[share],
        completions[share],
        advantages[share],
        pad_id,
        pack,
        distributed.mean_over_ranks(local_tokens),
    )
    grad_norm = distributed.clip_grad_norm([p for p in model.parameters()], 1e9)
    grads = dict(distributed.full_tensors((n, p.grad) for n, p in model.named_parameters()))
    return {"grads": grads, "grad_norm": grad_norm, "sharded": distributed.is_sharded(model)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_step_on_two_ranks_equals_one_process_on_the_global_batch(tmp_path, tiny_model_dir, strategy):
    """Each rank trains on half of the rollout; after the gradient all-reduce (DDP) or reduce-scatter
    (FSDP2) the gradients are the 1-process gradients of the whole rollout (DAPO token mean), on both ranks."""
    from transformers import AutoModelForCausalLM

    prompts, completions, advantages, pad_id, pack = _batch(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    total_tokens = sum(len(c) for c in completions)
    _dapo_step(reference, prompts, completions, advantages, pad_id, pack, total_tokens)
    expected = {n: p.grad for n, p in reference.named_parameters()}
    expected_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9))

    ranks = run_ranks(_train_step, tmp_path, str(tiny_model_dir), strategy)
    assert all(r["sharded"] == (strategy == "fsdp2") for r in ranks)
    for r in ranks:
        assert r["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
        for name, grad in expected.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _gather_weights(rank: int, model_dir: str):
    from transformers import AutoModelForCausalLM

    from online_rl.engines.weights import inference_weight_specs, inference_weights

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    distributed.wrap_policy(model, "fsdp2", distributed.Ranks(rank, WORLD, rank, torch.device("cpu")))
    local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    specs = [(n, tuple(shape)) for n, _, shape in inference_weight_specs(model)]
    weights = [
        (n, t.clone()) for n, t in inference_weights(model)
    ]  # every rank gathers, one tensor at a time
    state = distributed.full_state_dict(model)
    return {"local_shapes": local_shapes, "specs": specs, "weights": weights, "state": state}


def test_fsdp2_weights_are_gathered_in_full_for_the_engine_and_checkpoints(tmp_path, tiny_model_dir):
    """What the vLLM sync sends and a checkpoint saves under FSDP2: every weight whole, under its
    checkpoint name, equal to the unsharded model's, while each rank holds only half of each."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = dict(plain.named_parameters())
    ranks = run_ranks(_gather_weights, tmp_path, str(tiny_model_dir))
    embed = "model.embed_tokens.weight"
    assert ranks[0]["local_shapes"][embed][0] == math.ceil(expected[embed].shape[0] / 2)  # sharded on dim 0
    for r in ranks:
        assert [n for n, _ in r["weights"]] == list(expected)
        assert r["specs"] == [(n, tuple(p.shape)) for n, p in expected.items()]  # metadata without gathering
        for name, tensor in r["weights"]:
            torch.testing.assert_close(tensor, expected[name].detach(), rtol=0, atol=0)
    assert ranks[1]["state"] == {}  # the checkpoint's weights live on rank 0 only
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=0, atol=0)


# --- train.py under torchrun, as a user launches it -------------------------------------------------


def torchrun(tmp_path, *overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(free_port()), "train.py", f"hydra.run.dir={tmp_path}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def metrics_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_run_has_one_output_dir_one_metrics_log_and_one_trackio_run(tmp_path):
    result = torchrun(tmp_path, "hardware=cpu2", "vllm=off", "max_steps=3", "eval_every=0", *SMALL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert [m["step"] for m in metrics_lines(tmp_path)] == [1, 2, 3]  # logged once per step, by rank 0
    assert output.count("step 3/3 | reward") == 1  # one console
    assert (tmp_path / "checkpoints" / "step_000003" / "model.safetensors").exists()
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "config_resolved.yaml").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    with sqlite3.connect(tmp_path / "trackio" / "online-rl.db") as db:
        runs = db.execute("select distinct run_name from metrics").fetchall()
        steps = db.execute("select step from metrics order by step").fetchall()
    assert len(runs) == 1 and [s for (s,) in steps] == [1, 2, 3]


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_one_process_config_refuses_two_processes_and_the_reverse(tmp_path):
    result = torchrun(tmp_path, "hardware=cpu", "vllm=off", "max_steps=1", *SMALL)
    assert result.returncode != 0
    assert "hardware.num_processes=1 but 2 process(es) were launched" in result.stderr
    single = subprocess.run(
        [sys.executable, "train.py", "hardware=cpu2", f"hydra.run.dir={tmp_path}", *SMALL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode != 0 and "accelerate launch --num_processes 2" in single.stderr


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_two_ranks_follow_the_one_process_curves_and_fsdp2_equals_ddp(tmp_path):
    """20 GRPO steps with the same global batch (8 prompts x 8 samples): 2 DDP ranks (4 prompts each, their
    own sampling seeds) learn like 1 process, within sampling noise; 2 FSDP2 ranks take the same steps as
    2 DDP ranks (same data, same seeds: only the sharding differs)."""
    common = ["vllm=off", "max_steps=20", "eval_every=0", "logger=none"]
    one = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'one'}", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = torchrun(tmp_path / "ddp", "hardware=cpu2", *common)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    fsdp = torchrun(
        tmp_path / "fsdp2", "hardware=cpu2", "hardware.strategy=fsdp2", "vllm=off", "max_steps=5", *common[2:]
    )
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]

    def windows(run_dir):  # mean reward over 5-step windows
        rewards = [m["reward/total_mean"] for m in metrics_lines(run_dir)]
        return [sum(rewards[i : i + 5]) / 5 for i in range(0, len(rewards), 5)]

    single, two = windows(tmp_path / "one"), windows(tmp_path / "ddp")
    assert len(single) == len(two) == 4
    assert two[-1] > two[0] + 0.6 and single[-1] > single[0] + 0.6  # both learn
    assert max(abs(a - b) for a, b in zip(single, two)) < 0.2, (single, two)  # the same curve, within noise
    ddp_steps, fsdp_steps = metrics_lines(tmp_path / "ddp")[:5], metrics_lines(tmp_path / "fsdp2")
    for a, b in zip(ddp_steps, fsdp_steps):
        for key in ("reward/total_mean", "train/loss", "train/grad_norm", "adv/std"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_fsdp2_resume_from_sharded_checkpoint_ends_where_the_straight_run_does(tmp_path):
    """2 FSDP2 ranks, 4 steps straight with checkpoints at 2 and 4 (torch.distributed.checkpoint: each rank
    writes its shards of the weights and the Adam moments); a second run resumes from step 2 in its own
    directory and must end with the very weights of the straight run, via the same losses. The manifest
    covers the shard files: one damaged, resume=auto falls back to the checkpoint before it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from online_rl.loop import run
    from online_rl.resume import checkpoint_problems, find_checkpoint

    fsdp2 = ["hardware=cpu2", "hardware.strategy=fsdp2", "vllm=off", "logger=none", "eval_every=0",
             "max_steps=4", "optim.lr=1e-2", "optim.lr_scheduler=linear", "optim.warmup_steps=2", *SMALL]  # fmt: skip
    straight = torchrun(tmp_path / "straight", *fsdp2, "checkpoint_every=2")
    assert straight.returncode == 0, straight.stderr[-4000:]
    middle = tmp_path / "straight" / "checkpoints" / "step_000002"
    resumed = torchrun(tmp_path / "resumed", *fsdp2, f"resume={middle}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    losses = [m["train/loss"] for m in metrics_lines(tmp_path / "straight")]
    assert [m["train/loss"] for m in metrics_lines(tmp_path / "resumed")] == losses[2:]
    final = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "resumed")]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
    # the export is a plain Hugging Face directory, whole weights, whatever the sharding of the run
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "model")
    torch.testing.assert_close(exported.state_dict()["model.norm.weight"], final[1]["model.norm.weight"])

    newest = tmp_path / "straight" / "checkpoints" / "step_000004"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    shards = sorted(name for name in manifest if name.startswith("sharded/"))
    assert shards == ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"]
    assert "model.safetensors" not in manifest  # the weights live in the shards only
    data = bytearray((newest / "sharded" / "__1_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "sharded" / "__1_0.distcp").write_bytes(bytes(data))
    assert checkpoint_problems(newest) == [
        "sharded/__1_0.distcp has the right size but other bytes: its sha256 differs from the manifest's"
    ]
    assert find_checkpoint("auto", tmp_path / "straight") == middle
    one_process = [f"output_dir={tmp_path / 'one'}", f"resume={middle}", *fsdp2[2:]]
    with pytest.raises(ValueError, match="written by an FSDP2 run: resume it with hardware.strategy=fsdp2"):
        run(compose_config(one_process))
    with pytest.raises(ValueError, match=r"is an FSDP2 checkpoint: .*\(eval.model=<run dir>/model\)"):
        run(compose_config([*one_process[:1], *fsdp2[2:], "eval_only=true", f"eval.model={middle}"]))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_weight_specs_describe_what_the_engine_receives(tiny_model_dir, lora):
    """The server sync announces names, dtypes and shapes from inference_weight_specs (no LoRA merge, no
    FSDP2 gather) before it sends inference_weights: both must list the same tensors in the same order."""
    from omegaconf import OmegaConf

    from online_rl.engines.weights import inference_weight_specs, inference_weights
    from online_rl.models import load_policy

    model_cfg = OmegaConf.create(
        {
            "attn_implementation": "sdpa",
            "trust_remote_code": False,
            "gradient_checkpointing": False,
            "disable_dropout": True,
            "lora": {
                "enabled": lora,
                "r": 4,
                "alpha": 8,
                "dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"],
                "base_dtype": None,
            },
        }
    )
    model = load_policy(str(tiny_model_dir), model_cfg, torch.float32, torch.device("cpu"))
    sent = [(name, tensor.dtype, tensor.shape) for name, tensor in inference_weights(model)]
    assert list(inference_weight_specs(model)) == sent
    assert all("lora_" not in name and "base_layer" not in name for name, _, _ in sent)


@pytest.mark.parametrize(
    "environ, named",
    [
        ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true"}, "FSDP"),
        ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision=bf16"),
    ],
)
def test_accelerate_settings_the_trainer_does_not_read_are_refused(environ, named):
    """accelerate launch passes its config on as ACCELERATE_* variables; hardware= decides sharding and
    precision, so FSDP, DeepSpeed or mixed precision asked of accelerate stop the run instead of being ignored."""
    with pytest.raises(
        ValueError, match=f"accelerate launch passed {named}, which this trainer does not read"
    ):
        distributed.check_launch_settings(environ)


def test_a_plain_launch_passes_the_launch_settings_check():
    distributed.check_launch_settings({})  # torchrun: no accelerate settings at all
    distributed.check_launch_settings({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "false"})
