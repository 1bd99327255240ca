"""optim.name=muon: torch.optim.Muon's update, the Muon/AdamW split, and whole-matrix Newton–Schulz on FSDP2 shards.

The 2-process checks run in one torchrun job (gloo, CPU): this file is also the worker (`python -m
torch.distributed.run ... test_muon.py OUT BASE`). It steps a model wrapped with `fully_shard` and the same model
unsharded on the same full batch (FSDP2 averages identical gradients, so only the optimizer's handling of shards can
make them differ), counts collectives, then trains through the trainer on DDP and FSDP2. Rank 0 saves the results.
After the job, one process resumes the FSDP2 training from its 2-process checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from largebatch import config, optim
from largebatch.config import OptimConfig
from largebatch.dist import torchrun_command
from largebatch.errors import UserError
from largebatch.models.gpt import GPT
from largebatch.optim import muon
from largebatch.optim import newton_schulz as ns
from largebatch.optim.muon import Muon

ROOT = Path(__file__).resolve().parent.parent
HAS_TORCH_MUON = hasattr(torch.optim, "Muon")
needs_torch_muon = pytest.mark.skipif(
    not HAS_TORCH_MUON, reason="torch.optim.Muon needs torch ≥ 2.9"
)
STEPS = 5
LM = (
    f"--config={ROOT / 'configs/lamb-lm.yaml'}",
    "model.width=32",
    "data.context=32",
    "batch.global_size=32",
    "batch.micro_size=16",
    "train.steps=20",
    "schedule.name=constant",
    "schedule.warmup_steps=2",
    "train.clip_grad_norm=0.3",
    "train.log_every=1",
    "train.eval_every=0",
    "logging.progress=false",
    "optim.name=muon",
    "optim.lr=0.02",
    "optim.options.adamw_lr=0.003",
    "optim.options.ns_dtype=fp32",
)
"""The byte-level GPT (two blocks, tied embeddings) with Muon in fp32 Newton–Schulz, clipping on."""
TRAININGS = {
    "ddp": LM,
    "fsdp": (*LM, "engine.name=fsdp", "train.checkpoint_every=10"),
    "fsdp-a2": (*LM, "engine.name=fsdp", "batch.micro_size=8"),
    "ddp-a2": (*LM, "batch.micro_size=8"),
}
HF = (
    "data.name=tokens",
    "data.context=32",
    "optim.name=muon",
    "optim.lr=0.02",
    "optim.options.adamw_lr=0.003",
    "optim.options.ns_dtype=fp32",
    "batch.global_size=16",
    "batch.micro_size=8",
    "train.steps=20",
    "train.clip_grad_norm=0.3",
    "train.log_every=1",
    "logging.progress=false",
)
"""A 1-layer hf: GPT-2 (Conv1D weights, tied head) with Muon; data.path and model.name come from the fixture."""
USER = (
    f"--config={ROOT / 'tests/tasks/linreg.yaml'}",
    "model.name=linreg:hidden_model",
    "model.args={hidden: 33}",
    "data.args={sigma: 1.0, size: 1024}",
    "train.noise_scale=false",
    "batch.global_size=32",
    "batch.micro_size=16",
    "train.steps=20",
    "train.clip_grad_norm=0.3",
    "optim.name=muon",
    "optim.lr=0.02",
    "optim.scaling=none",
    "optim.options.adamw_lr=0.003",
    "optim.options.ns_dtype=fp32",
)
"""A user module: linear regression through a (33, 16) hidden matrix, which FSDP2 shards 17/16 rows."""


def midway(base: Path) -> Path:
    """The FSDP2 training's checkpoint at step 10 of 20, which the resumed trainings start from."""
    return base / "fsdp" / "checkpoints" / "step_00000010"


def fp32_zeropower(grad, coefficients, steps, eps):
    """torch's `_zeropower_via_newtonschulz` with the iteration in fp32 instead of bf16."""
    a, b, c = coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def gpt_matrices() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(vocab=64, context=16, width=32, depth=2, heads=2)
    return [
        p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n
    ]


def step_both(ours: Muon, reference: torch.optim.Optimizer, a: list, b: list, steps: int) -> float:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    return max((p - q).abs().max().item() for p, q in zip(a, b))


@needs_torch_muon
@pytest.mark.parametrize("adjust_lr", muon.ADJUST_LR)
def test_fp32_muon_equals_torch_muon_with_fp32_newton_schulz_over_20_steps(adjust_lr: str) -> None:
    a = [p.clone().requires_grad_() for p in gpt_matrices()]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = Muon(a, lr=0.02, weight_decay=0.1, ns_dtype="fp32", adjust_lr=adjust_lr)
    reference = torch.optim.Muon(b, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr)
    with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", fp32_zeropower):
        assert step_both(ours, reference, a, b, 20) <= 1e-5


@needs_torch_muon
def test_bf16_muon_equals_torch_muon_over_20_steps() -> None:
    a = [p.clone().requires_grad_() for p in gpt_matrices()]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = Muon(a, lr=0.02, weight_decay=0.1, nesterov=False, momentum=0.9)
    reference = torch.optim.Muon(b, lr=0.02, weight_decay=0.1, nesterov=False, momentum=0.9)
    assert step_both(ours, reference, a, b, 20) <= 1e-6


def test_the_adamw_side_equals_torch_adamw() -> None:
    a = [p.clone().requires_grad_() for p in gpt_matrices()]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = Muon([{"params": a, "use_muon": False}], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    reference = torch.optim.AdamW(b, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), foreach=True)
    assert step_both(ours, reference, a, b, 10) == 0.0


def groups_by_name(model: nn.Module, cfg: OptimConfig) -> list[tuple[bool, bool, list[str]]]:
    """(use_muon, transposed, parameter names) of each group optim.build makes."""
    names = {id(p): n for n, p in model.named_parameters()}
    built = optim.build(model, cfg, cfg.lr)
    return [
        (g["use_muon"], g.get("transposed", False), [names[id(p)] for p in g["params"]])
        for g in built.param_groups
    ]


def test_the_builtin_gpt_gives_block_matrices_to_muon_and_embeddings_and_1d_to_adamw() -> None:
    torch.manual_seed(0)
    model = GPT(vocab=64, context=16, width=32, depth=1, heads=2)
    groups = groups_by_name(model, OptimConfig(name="muon", lr=0.02, weight_decay=0.1))
    muon_names = [n for use, _, names in groups if use for n in names]
    adamw_names = [n for use, _, names in groups if not use for n in names]
    assert muon_names == [
        "blocks.0.qkv.weight",
        "blocks.0.proj.weight",
        "blocks.0.mlp.0.weight",
        "blocks.0.mlp.2.weight",
    ]
    assert {"token.weight", "position.weight", "ln.weight", "blocks.0.qkv.bias"} <= set(adamw_names)
    assert groups[0][0], "Muon's group comes first (its LR is the one logged)"


def test_an_hf_gpt2_gives_conv1d_weights_to_muon_marked_transposed_and_its_head_to_adamw(
    tmp_path: Path,
) -> None:
    from conftest import write_tiny_gpt2
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config.from_pretrained(write_tiny_gpt2(tmp_path)))
    groups = groups_by_name(model, OptimConfig(name="muon", lr=0.02))
    assert [(use, t) for use, t, _ in groups] == [(True, True), (False, False), (False, False)]
    assert groups[0][2] == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    assert "transformer.wte.weight" in groups[1][2], "the head is tied to the token embedding"


def test_a_conv1d_weight_takes_the_lr_adjustment_of_its_out_in_shape(tmp_path: Path) -> None:
    """c_fc stores (in 32, out 128): 'original' scales by √(128/32) = 2 as for nn.Linear(32, 128), not by 1."""
    from conftest import write_tiny_gpt2
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config.from_pretrained(write_tiny_gpt2(tmp_path)))
    weight = model.transformer.h[0].mlp.c_fc.weight
    before = weight.detach().clone()
    cfg = OptimConfig(name="muon", lr=0.01, options={"ns_dtype": "fp32", "nesterov": False})
    optimizer = optim.build(model, cfg, 0.01)
    weight.grad = torch.randn(weight.shape)
    optimizer.step()
    orthogonal = ns.newton_schulz(0.05 * weight.grad[None], 5)[0]
    torch.testing.assert_close(weight.detach(), before - 0.01 * 2.0 * orthogonal)


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (30, 2, 2, 2)])
def test_conv_kernels_are_orthogonalised_as_out_by_in_k_k_matrices(shape: tuple[int, ...]) -> None:
    """A wide (8 × 27) and a tall (30 × 8) kernel matrix."""
    conv = nn.Parameter(torch.randn(shape))
    conv.grad = torch.randn(shape)
    before = conv.detach().clone()
    Muon([conv], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, ns_dtype="fp32").step()
    flat = ns.newton_schulz(conv.grad.reshape(1, shape[0], -1), 5)[0]
    scale = max(1.0, flat.size(0) / flat.size(1)) ** 0.5
    torch.testing.assert_close(conv.detach(), before - 0.1 * scale * flat.reshape(shape))


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_update_rms_is_the_rms_of_the_update_muon_added_to_each_matrix(adjust_lr: str) -> None:
    torch.manual_seed(0)
    model = GPT(vocab=64, context=16, width=32, depth=2, heads=2)
    options = {"ns_dtype": "fp32", "adjust_lr": adjust_lr}
    built = optim.build(
        model, OptimConfig(name="muon", lr=0.02, weight_decay=0.1, options=options), 0.02
    )
    model(torch.randint(0, 64, (4, 16))).square().mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    built.step()
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
    expected = {
        f"update_rms/{n}": (before[n] * (1 - 0.02 * 0.1) - p).square().mean().sqrt().item()
        for n, p in matrices
    }
    logged = optim.update_rms(model, built)
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4)


def test_bench_optim_muon_prints_both_precisions_against_torch_and_the_flop_floor(
    monkeypatch, capsys
) -> None:
    from largebatch.bench import optim as bench_optim

    monkeypatch.setattr(bench_optim, "GPTS", {"small": (32, 1)})
    monkeypatch.setattr(bench_optim, "MUON_GOALS", {"small": 1.5})
    threads = torch.get_num_threads()
    try:
        assert bench_optim.main(["--muon", "--steps=3", "--warmup=1", "--threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    flops = sum(ns.ns_flops(r, c, 5) for r, c in bench_optim.gpt_matrix_shapes(32, 1))
    for ns_dtype in ("bf16", "fp32"):
        row = next(r for r in rows if r[:2] == ["small", ns_dtype])
        assert float(row[-3]) == pytest.approx(flops / 1e9, rel=1e-3)
        assert len(row) == (9 if HAS_TORCH_MUON else 6)
    if HAS_TORCH_MUON:
        assert any(r[-2:] == ["≥", "1.5)"] for r in rows)


def test_owners_balance_newton_schulz_flops_over_ranks() -> None:
    flops = [ns.ns_flops(r, c, 5) for r, c in [(128, 32), (32, 32), (32, 32), (32, 128), (16, 16)]]
    owner = ns.owners(flops, 2)
    loads = [sum(f for f, o in zip(flops, owner) if o == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.5


def test_shard_rows_follow_torch_chunk_with_empty_last_shards() -> None:
    assert ns.shard_rows(33, 2) == [17, 16]
    assert ns.shard_rows(1, 2) == [1, 0]
    assert ns.shard_rows(5, 4) == [2, 2, 1, 0]


def test_muon_on_deepspeed_zero_1_is_refused_naming_fsdp() -> None:
    from largebatch.engine.deepspeed import DeepSpeedEngine
    from largebatch.engine.features import refuse

    with pytest.raises(UserError, match="use engine.name=fsdp"):
        refuse(
            DeepSpeedEngine,
            config.load(None, ["optim.name=muon", "engine.name=deepspeed", "engine.zero_stage=1"]),
        )
    refuse(
        DeepSpeedEngine,
        config.load(None, ["optim.name=muon", "engine.name=deepspeed", "engine.zero_stage=0"]),
    )


@pytest.mark.parametrize(
    "cfg, message",
    [
        (OptimConfig(name="muon", options={"ns_step": 5}), "did you mean 'ns_steps'"),
        (OptimConfig(name="muon", options={"ns_dtype": "fp16"}), "must be one of bf16, fp32"),
        (OptimConfig(name="muon", momentum=0.95), "set optim.options.momentum"),
        (OptimConfig(name="muon", options={"adamw_lr": 0}), "adamw_lr=0 must be positive"),
    ],
)
def test_bad_muon_options_are_one_line_errors_with_the_fix(cfg: OptimConfig, message: str) -> None:
    with pytest.raises(UserError, match=message) as error:
        optim.check(cfg)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """What rank 0 of the 2-process job saved, and the trainings' base directory."""
    from conftest import cli, write_tiny_gpt2, write_tokens

    base = tmp_path_factory.mktemp("muon")
    write_tiny_gpt2(base / "tiny-gpt2")
    write_tokens(base / "train.bin", 20_000)
    out = base / "results.pt"
    done = subprocess.run(
        [
            *torchrun_command(2),
            __file__,
            str(out),
            str(base),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # The 2-process FSDP2 checkpoint, resumed on 1 process (same global batch, so accumulation 2).
    one = cli(
        "train",
        *TRAININGS["fsdp"],
        f"run.resume={midway(base)}",
        f"run.dir={base / 'fsdp-on-1'}",
        env={"PYTHONPATH": str(ROOT)},
    )
    assert one.returncode == 0, one.stderr[-4000:]
    return {**torch.load(out), "base": base, "stdout": done.stdout}


@pytest.mark.parametrize("ns_dtype, bound", [("fp32", 1e-6), ("bf16", 2e-3)])
def test_sharded_muon_equals_unsharded_muon(results: dict, ns_dtype: str, bound: float) -> None:
    assert results[f"max_diff/{ns_dtype}"] <= bound


@needs_torch_muon
def test_sharded_muon_equals_torch_muon_on_the_same_dtensors(results: dict) -> None:
    """One step from the same weights and gradients within 1e-6 (measured 2.2e-7 at lr 0.05): torch's iteration runs
    as DTensor ops on the shards, which sum a norm or a tall matrix's Gram product across ranks in another order
    (1-2 ulp), and the 5 Newton–Schulz steps amplify that. Then the runs see different gradients and the difference
    grows by about 2.5e-7 a step (measured 1.3e-6 after 5 steps, 2.3e-6 after 10, 4.3e-6 after 20)."""
    first, *_, last = results["diffs/torch"]
    assert first <= 1e-6
    assert last <= 2e-6


@needs_torch_muon
def test_two_all_to_alls_per_step_against_torch_muons_implicit_collectives(results: dict) -> None:
    assert results["collectives/ours"] == [2] * STEPS
    assert results["collectives/torch"][0] >= 4 * results["matrices/torch"]


def test_each_rank_runs_about_half_of_the_newton_schulz_flops(results: dict) -> None:
    per_rank = results["ns_flops"]
    assert sum(per_rank) == results["ns_flops_total"]
    assert max(per_rank) <= 0.7 * sum(per_rank)


def test_ddp_replicas_split_the_newton_schulz_work_and_equal_the_replicated_computation(
    results: dict,
) -> None:
    assert results["max_diff/replicated"] == 0.0
    assert results["all_gathers/replicated"] == STEPS, "one all-gather a step"
    assert results["ns_flops/replicated"] <= 0.6 * results["ns_flops_total"]


def read(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.mark.parametrize("case", ["", "-a2", "-hf", "-user", "-user-a2"])
def test_fsdp_training_follows_ddp_training(results: dict, case: str) -> None:
    """20 steps, clipping on: the built-in GPT and a user module (a (33, 16) matrix) at accumulation 1 and 2, and an
    hf: GPT-2 (Conv1D weights sharded on their `in` rows); per-step losses and final parameters within 1e-5."""
    ddp, fsdp = (results["base"] / f"{e}{case}" for e in ("ddp", "fsdp"))
    ddp_log, fsdp_log = read(ddp, "metrics.jsonl"), read(fsdp, "metrics.jsonl")
    assert len(ddp_log) == len(fsdp_log) == 20
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp_log, fsdp_log)) <= 1e-5
    assert fsdp_log[-1]["loss"] < fsdp_log[0]["loss"]
    a, b = torch.load(ddp / "model.pt"), torch.load(fsdp / "model.pt")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_update_rms_is_logged_per_matrix_and_fsdp_sums_it_over_shards(results: dict) -> None:
    """FSDP2's update RMS of each matrix, from the squares of its shards, equals DDP's of the whole matrix."""
    ddp, fsdp = (read(results["base"] / e, "metrics.jsonl") for e in ("ddp", "fsdp"))
    keys = [k for k in ddp[0] if k.startswith("update_rms/")]
    assert len(keys) == 8 and "update_rms/blocks.0.qkv.weight" in keys
    for a, b in zip(ddp, fsdp):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4)


def test_a_resumed_fsdp_run_ends_with_the_parameters_of_the_straight_one(results: dict) -> None:
    straight = json.loads((results["base"] / "fsdp" / "summary.json").read_text())
    resumed = json.loads((results["base"] / "fsdp-resumed" / "summary.json").read_text())
    assert resumed["params_sha256"] == straight["params_sha256"]


def test_a_2_process_fsdp_checkpoint_resumed_on_1_process_follows_the_straight_run(
    results: dict,
) -> None:
    straight = {m["step"]: m["loss"] for m in read(results["base"] / "fsdp", "metrics.jsonl")}
    resumed = read(results["base"] / "fsdp-on-1", "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(11, 21))
    assert max(abs(m["loss"] - straight[m["step"]]) for m in resumed) <= 1e-5


def test_the_split_is_printed_and_written_to_config_yaml(results: dict) -> None:
    import yaml

    assert "optim.name=muon: Muon on 8 matrices" in results["stdout"]
    derived = yaml.safe_load((results["base"] / "fsdp" / "config.yaml").read_text())["derived"]
    assert derived["optimizer_split"]["muon"]["tensors"] == 8


class Net(nn.Module):
    """Matrices of odd row counts: (33, 16) splits 17/16, (1, 33) leaves rank 1 an empty shard; a 3-D kernel; two
    (33, 33) matrices, so that the Newton–Schulz work can split evenly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.a = nn.Linear(16, 33)
        self.b = nn.Linear(33, 33, bias=False)
        self.d = nn.Linear(33, 33, bias=False)
        self.c = nn.Linear(33, 1, bias=False)
        self.kernel = nn.Parameter(torch.randn(5, 2, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.d(torch.tanh(self.b(torch.tanh(self.a(self.embed(x)))))))
        return (
            self.c(h).square().mean() + (self.kernel.sum(0) * h[..., :6].reshape(-1, 2, 3)).mean()
        )


def counting(flops: list[int]):
    """`newton_schulz.newton_schulz` that appends the FLOPs of each call to `flops`."""
    real = ns.newton_schulz

    def newton_schulz(u: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
        flops.append(u.size(0) * ns.ns_flops(u.size(1), u.size(2), steps))
        return real(u, steps, eps)

    return newton_schulz


def against_torch_muon(models, full, x: torch.Tensor) -> dict:
    """torch.optim.Muon (2-D only) and ours on the same FSDP2 DTensors, fp32 Newton–Schulz, stepped side by side: the
    largest parameter difference after each step and torch's collectives per step (CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode

    _, ours_model = models()
    _, torch_model = models()
    for model in (
        ours_model,
        torch_model,
    ):  # torch's Muon takes 2-D only, and fails on the (1, 33) row
        model.kernel.requires_grad_(False)
        model.c.weight.requires_grad_(False)

    def matrices(m: nn.Module) -> list[torch.Tensor]:
        return [m.a.weight, m.b.weight, m.d.weight]

    def rest(m: nn.Module) -> list[torch.Tensor]:
        return [m.embed.weight, m.a.bias]

    ours = Muon(
        [
            {"params": matrices(ours_model)},
            {"params": rest(ours_model), "use_muon": False, "lr": 1e-3},
        ],
        lr=0.05,
        ns_dtype="fp32",
    )
    theirs = torch.optim.Muon(matrices(torch_model), lr=0.05)
    adamw = torch.optim.AdamW(rest(torch_model), lr=1e-3, weight_decay=0.1, foreach=True)
    torch_counts: list[int] = []
    diffs: list[float] = []
    with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", fp32_zeropower):
        for _ in range(STEPS):
            ours_model(x).backward()
            ours.step()
            ours.zero_grad()
            torch_model(x).backward()
            with CommDebugMode() as comm:
                theirs.step()
            torch_counts.append(comm.get_total_counts())
            adamw.step()
            theirs.zero_grad()
            adamw.zero_grad()
            diffs.append(
                max((a - b).abs().max().item() for a, b in zip(full(ours_model), full(torch_model)))
            )
    return {
        "diffs/torch": diffs,
        "collectives/torch": torch_counts,
        "matrices/torch": 3,
    }


def _worker(out: Path, base: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from largebatch import config, job, trainer
    from largebatch import dist as lb_dist

    info = lb_dist.from_env()
    lb_dist.init(info, always=True)
    results: dict = {}
    x = torch.randint(0, 10, (8, 4), generator=torch.Generator().manual_seed(0))

    def models() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        whole = Net()
        sharded = Net()
        sharded.load_state_dict(whole.state_dict())
        for layer in (sharded.a, sharded.b, sharded.c, sharded.d):
            fully_shard(layer)
        fully_shard(sharded)
        return whole, sharded

    def muon_groups(model: nn.Module) -> list[dict]:
        return [
            {
                "params": [
                    p for n, p in model.named_parameters() if p.ndim >= 2 and n != "embed.weight"
                ]
            },
            {
                "params": [
                    p for n, p in model.named_parameters() if p.ndim < 2 or n == "embed.weight"
                ],
                "use_muon": False,
            },
        ]

    def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(STEPS):
            model(x).backward()
            optimizer.step()
            optimizer.zero_grad()

    def full(model: nn.Module) -> list[torch.Tensor]:
        return [
            p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()
        ]

    for ns_dtype in ("fp32", "bf16"):
        whole, sharded = models()
        train(whole, Muon(muon_groups(whole), lr=0.05, ns_dtype=ns_dtype))
        flops: list[int] = []
        with (
            mock.patch.object(ns, "newton_schulz", counting(flops)),
            mock.patch.object(dist, "all_to_all_single", wraps=dist.all_to_all_single) as a2a,
        ):
            ours = Muon(muon_groups(sharded), lr=0.05, ns_dtype=ns_dtype)
            counts: list[int] = []
            for _ in range(STEPS):
                before = a2a.call_count
                sharded(x).backward()
                ours.step()
                ours.zero_grad()
                counts.append(a2a.call_count - before)
        results[f"max_diff/{ns_dtype}"] = max(
            (a - b).abs().max().item() for a, b in zip(full(whole), full(sharded))
        )
        if ns_dtype == "fp32":
            results["collectives/ours"] = counts
            mine = torch.tensor([sum(flops)], dtype=torch.int64)
            gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, mine)
            results["ns_flops"] = [int(g) for g in gathered]
            results["ns_flops_total"] = STEPS * sum(
                ns.ns_flops(p.shape[0], p[0].numel(), 5) for p in muon_groups(whole)[0]["params"]
            )

    # DDP's replicas: the Newton–Schulz work split over the ranks against every rank doing all of it.
    torch.manual_seed(0)
    replicated, alone = Net(), Net()
    alone.load_state_dict(replicated.state_dict())
    train(alone, Muon(muon_groups(alone), lr=0.05))
    flops = []
    with (
        mock.patch.object(ns, "newton_schulz", counting(flops)),
        mock.patch.object(dist, "all_gather", wraps=dist.all_gather) as gather,
    ):
        train(replicated, Muon(muon_groups(replicated), lr=0.05, replicated=dist.group.WORLD))
    results["max_diff/replicated"] = max(
        (a - b).abs().max().item() for a, b in zip(full(replicated), full(alone))
    )
    results["all_gathers/replicated"] = gather.call_count
    results["ns_flops/replicated"] = sum(flops)

    if HAS_TORCH_MUON:
        results.update(against_torch_muon(models, full, x))

    hf = (*HF, f"data.path={base / 'train.bin'}", f"model.name=hf:{base / 'tiny-gpt2'}")
    runs = {
        **TRAININGS,
        "fsdp-resumed": (*TRAININGS["fsdp"], f"run.resume={midway(base)}"),
        "ddp-hf": hf,
        "fsdp-hf": (*hf, "engine.name=fsdp"),
        "ddp-user": USER,
        "fsdp-user": (*USER, "engine.name=fsdp"),
        "ddp-user-a2": (*USER, "batch.micro_size=8"),
        "fsdp-user-a2": (*USER, "engine.name=fsdp", "batch.micro_size=8"),
    }
    for name, args in runs.items():
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
        cfg = config.load(
            path, [a for a in args if not a.startswith("--config=")] + [f"run.dir={base / name}"]
        )
        trainer.fit(job.prepare(cfg, info.world_size), info)
    if info.rank == 0:
        torch.save(results, out)
    lb_dist.teardown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
