"""optim.groups: which parameters each group's optimizer takes, a mix equal to each optimizer on its own share, one
optimizer object through checkpoints (DDP and FSDP2 resumes), and the one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_in_process, metrics, train_in_one_job
from torch import nn

from largebatch import optim
from largebatch.config import OptimConfig
from largebatch.models.gpt import GPT
from largebatch.optim.composite import Composite
from largebatch.optim.lamb import LAMB
from largebatch.optim.muon import Muon
from largebatch.optim.state import load_named_state_dict, named_state_dict

MIXED = [
    {"match": "matrix", "name": "lamb", "lr": 0.02, "weight_decay": 0.1, "impl": "foreach"},
    {"match": "*", "name": "adamw", "lr": 0.003, "betas": [0.8, 0.95]},
]


class Net(nn.Module):
    """An embedding, a hidden matrix, a norm, a bias-carrying head: one parameter of every kind."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.hidden = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.hidden(self.embed(x)))))


def names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    """The parameter names each child optimizer steps."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for g in c.param_groups for p in g["params"]} for c in optimizer.children]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().pow(2).mean()


def test_the_first_group_that_matches_takes_the_parameter() -> None:
    model = Net()
    cfg = OptimConfig(
        groups=[
            {"match": "head.*", "name": "sgd"},
            {"match": "1d", "name": "adamw"},
            {"match": "*", "name": "lamb"},
        ]
    )
    optimizer = optim.build(model, cfg, 0.1)
    assert isinstance(optimizer, Composite)
    assert names(model, optimizer) == [
        {"head.weight", "head.bias"},
        {"norm.weight", "norm.bias"},
        {"embed.weight", "hidden.weight"},
    ]


def test_each_group_takes_its_optimizer_and_options_over_the_top_level_ones() -> None:
    model = GPT(vocab=64, context=16, width=16, depth=1, heads=2)
    cfg = OptimConfig(lr=0.01, weight_decay=0.05, eps=1e-6, groups=copy.deepcopy(MIXED))
    optimizer = optim.build(model, cfg, 0.04)  # the scaling rule made optim.lr 4x
    lamb, adamw = optimizer.children
    assert isinstance(lamb, LAMB) and isinstance(adamw, torch.optim.AdamW)
    assert names(model, optimizer)[0] == {
        n
        for n, p in model.named_parameters()
        if p.ndim == 2 and "token" not in n and "position" not in n
    }
    assert [g["lr"] for g in lamb.param_groups] == pytest.approx([0.08])
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.012, 0.012])
    assert lamb.param_groups[0]["weight_decay"] == 0.1
    assert adamw.param_groups[0]["weight_decay"] == 0.05, "unset: the top-level optim.weight_decay"
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95)
    assert adamw.param_groups[0]["eps"] == lamb.param_groups[0]["eps"] == 1e-6
    assert [g["weight_decay"] for g in adamw.param_groups][-1] == 0.0, "1-D parameters: no decay"
    assert optimizer.param_groups == [*lamb.param_groups, *adamw.param_groups]
    assert all(
        a is b for a, b in zip(optimizer.param_groups, [*lamb.param_groups, *adamw.param_groups])
    )


def test_kinds_name_embeddings_head_matrices_norms_and_biases() -> None:
    model = Net()
    cfg = OptimConfig(
        groups=[
            {"match": "embedding", "name": "adamw"},
            {"match": "head", "name": "sgd"},
            {"match": "matrix", "name": "muon"},
            {"match": "norm", "name": "lars"},
            {"match": "bias", "name": "lamb"},
        ]
    )
    model.hidden.bias = nn.Parameter(torch.zeros(8))
    optimizer = optim.build(model, cfg, 0.1)
    assert names(model, optimizer) == [
        {"embed.weight"},
        {"head.weight", "head.bias"},
        {"hidden.weight"},
        {"norm.weight", "norm.bias"},
        {"hidden.bias"},
    ]
    assert isinstance(optimizer.children[2], Muon)


def test_mixed_lamb_and_adamw_equal_each_optimizer_on_its_own_parameters() -> None:
    torch.manual_seed(0)
    model = GPT(vocab=64, context=16, width=16, depth=2, heads=2)
    alone = copy.deepcopy(model)
    cfg = OptimConfig(lr=0.01, weight_decay=0.05, groups=copy.deepcopy(MIXED))
    mixed = optim.build(model, cfg, 0.01)
    matrices = [p for n, p in alone.named_parameters() if n.startswith("blocks") and p.ndim == 2]
    rest = [p for p in alone.parameters() if all(p is not m for m in matrices)]
    by_hand = [
        LAMB(matrices, lr=0.02, eps=1e-8, weight_decay=0.1, impl="foreach"),
        torch.optim.AdamW(
            [
                {"params": [p for p in rest if p.ndim == 2], "weight_decay": 0.05},
                {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=0.003,
            betas=(0.8, 0.95),
        ),
    ]
    x = torch.randint(0, 64, (4, 16))
    for _ in range(5):
        for m, steppers in ((model, [mixed]), (alone, by_hand)):
            loss_of(m, x).backward()
            for s in steppers:
                s.step()
                s.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), alone.parameters()))
    assert diff <= 1e-6, diff


def test_the_muon_preset_equals_its_groups_matrix_muon_then_catch_all_adamw() -> None:
    torch.manual_seed(0)
    model = GPT(vocab=64, context=16, width=16, depth=2, heads=2)
    preset = copy.deepcopy(model)
    muon_options = {"adamw_lr": 0.003, "ns_dtype": "fp32"}
    steppers = {
        "groups": optim.build(
            model,
            OptimConfig(
                lr=0.02,
                weight_decay=0.1,
                groups=[
                    {"match": "matrix", "name": "muon", "ns_dtype": "fp32"},
                    {"match": "*", "name": "adamw", "lr": 0.003},
                ],
            ),
            0.02,
        ),
        "preset": optim.build(
            preset, OptimConfig(name="muon", lr=0.02, weight_decay=0.1, options=muon_options), 0.02
        ),
    }
    x = torch.randint(0, 64, (4, 16))
    for _ in range(5):
        for m, o in zip((model, preset), steppers.values()):
            loss_of(m, x).backward()
            o.step()
            o.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), preset.parameters()))
    assert diff <= 1e-6, diff


def test_a_loaded_state_continues_as_if_never_saved_and_keeps_children_shared() -> None:
    torch.manual_seed(0)
    model = GPT(vocab=64, context=16, width=16, depth=1, heads=2)
    cfg = OptimConfig(lr=0.01, groups=copy.deepcopy(MIXED))
    x = torch.randint(0, 64, (4, 16))
    first = optim.build(model, cfg, 0.01)
    for _ in range(2):
        loss_of(model, x).backward()
        first.step()
        first.zero_grad()
    copied = copy.deepcopy(model)
    second = optim.build(copied, cfg, 0.01)
    load_named_state_dict(copied, second, copy.deepcopy(named_state_dict(model, first)))
    assert all(
        a is b
        for a, b in zip(second.param_groups, [g for c in second.children for g in c.param_groups])
    )
    assert all(c.state is second.state for c in second.children)
    for m, o in ((model, first), (copied, second)):
        o.param_groups[0]["lr"] = 0.5  # what optim/hyper.py does each step: it must reach the child
        for _ in range(2):
            loss_of(m, x).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copied.parameters()))


def test_trust_ratios_are_logged_for_the_lamb_group_only() -> None:
    model = GPT(vocab=64, context=16, width=16, depth=1, heads=2)
    optimizer = optim.build(model, OptimConfig(lr=0.01, groups=copy.deepcopy(MIXED)), 0.01)
    loss_of(model, torch.randint(0, 64, (2, 16))).backward()
    optimizer.step()
    ratios = optim.trust_ratios(model, optimizer)
    assert set(ratios) == {f"trust_ratio/{n}" for n in names(model, optimizer)[0]}


GROUPS = (
    "optim.groups=[{match: matrix, name: lamb, lr: 0.01}, {match: '*', name: adamw, lr: 0.003}]"
)
ERRORS = {
    "pattern_matches_nothing": (
        "optim.groups=[{match: '*.gate', name: lamb}, {match: '*', name: adamw}]",
        "optim.groups[0] {match: '*.gate', name: lamb} matches no parameter",
    ),
    "parameter_matched_by_no_group": (
        "optim.groups=[{match: matrix, name: lamb}]",
        "are matched by no group of optim.groups; add a catch-all group at the end, e.g. {match: '*', name: adamw}",
    ),
    "bad_value_names_the_group": (
        "optim.groups=[{match: matrix, name: lamb}, {match: '*', name: adamw, lr: -1}]",
        "optim.groups[1].lr=-1.0 must be positive",
    ),
    "wrong_type_names_the_group": (
        "optim.groups=[{match: '*', name: adamw, lr: fast}]",
        "optim.groups[0].lr='fast' must be a number",
    ),
    "option_of_another_optimizer": (
        "optim.groups=[{match: '*', name: adamw, momentum: 0.9}]",
        "optim.groups[0] key for name=adamw='momentum' is not one of",
    ),
    "unknown_optimizer": ("optim.groups=[{match: '*', name: lamm}]", "did you mean 'lamb'"),
    "muon_on_1d_parameters": (
        "optim.groups=[{match: '*', name: muon}, {match: '*', name: adamw}]",
        "which Muon cannot orthogonalise; put a group for them before it, e.g. {match: 1d, name: adamw}",
    ),
    "optim_name_beside_groups": ("optim.name=lamb", "drop optim.name"),
    "top_level_key_no_group_uses": (
        "optim.trust_coefficient=0.02",
        "optim.trust_coefficient is ignored with optim.groups=[lamb, adamw] (only lars and larc use it)",
    ),
    "zero_stage_1": ("engine.name=deepspeed", "use engine.name=fsdp or ddp"),
}
EXTRA = {
    "zero_stage_1": ("engine.zero_stage=1", GROUPS),
    "optim_name_beside_groups": (GROUPS,),
    "top_level_key_no_group_uses": (GROUPS,),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_group_mistakes_are_one_line_errors_with_the_fix(case: str, tmp_path: Path) -> None:
    override, message = ERRORS[case]
    result = cli_in_process(
        "train",
        f"--config={ROOT / 'configs/lamb-lm.yaml'}",
        "model.width=16",
        "optim.name=sgd",  # the config's lamb: each group names its optimizer
        f"run.dir={tmp_path}",
        override,
        *EXTRA.get(case, ()),
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr


LM = (
    f"--config={ROOT / 'configs/lamb-lm.yaml'}",
    "model.width=32",
    "data.context=32",
    "batch.global_size=32",
    "batch.micro_size=16",
    "train.steps=6",
    "schedule.warmup_steps=2",
    "train.clip_grad_norm=0.5",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=3",
    "logging.progress=false",
    "optim.name=sgd",
    "optim.lr=0.01",
    "optim.groups=[{match: matrix, name: muon, lr: 0.02, ns_dtype: fp32}, {match: embedding, name: lamb},"
    " {match: '*', name: adamw, lr: 0.003}]",
)
"""The byte-level GPT with Muon on its matrices, LAMB on its embeddings, AdamW on the rest."""


@pytest.fixture(scope="module")
def trainings(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("groups")
    runs = {}
    for engine in ("ddp", "fsdp"):
        runs[engine] = (*LM, f"engine.name={engine}")
        resume = f"run.resume={base / engine / 'checkpoints' / 'step_00000003'}"
        runs[f"{engine}-resumed"] = (*runs[engine], resume)
    runs["zero0"] = (*LM, "engine.name=deepspeed", "engine.zero_stage=0")
    train_in_one_job(base, runs)
    return base


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_resumed_run_ends_with_the_parameters_of_the_straight_one(
    trainings: Path, engine: str
) -> None:
    straight, resumed = (
        json.loads((trainings / name / "summary.json").read_text())
        for name in (engine, f"{engine}-resumed")
    )
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["steps"] == straight["steps"] == 6


@pytest.mark.parametrize("engine", ["fsdp", "zero0"])
def test_fsdp_and_zero_0_follow_ddp_and_log_the_lamb_groups_trust_ratios(
    trainings: Path, engine: str
) -> None:
    ddp, other = metrics(trainings / "ddp"), metrics(trainings / engine)
    assert len(ddp) == len(other) == 6
    for a, b in zip(ddp, other):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert "trust_ratio/token.weight" in other[-1]
    assert other[-1]["loss"] < other[0]["loss"]


def test_the_groups_split_is_written_to_config_yaml(trainings: Path) -> None:
    import yaml

    derived = yaml.safe_load((trainings / "fsdp" / "config.yaml").read_text())["derived"]
    split = derived["optimizer_split"]
    assert [g["group"] for g in split] == [
        "[0] matrix → muon",
        "[1] embedding → lamb",
        "[2] * → adamw",
    ]
    assert split[0]["tensors"] == 8


def test_a_resume_with_other_groups_is_refused_in_one_line(trainings: Path, tmp_path: Path) -> None:
    other = "optim.groups=[{match: '*', name: adamw}]"
    checkpoint = trainings / "ddp" / "checkpoints" / "step_00000003"
    result = cli_in_process("train", *LM, other, f"run.dir={tmp_path}", f"run.resume={checkpoint}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert (
        "was trained with optim.groups=['matrix → muon', 'embedding → lamb', '* → adamw']"
        in lines[0]
    )
