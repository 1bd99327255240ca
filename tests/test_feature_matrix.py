"""The feature × engine matrix (docs/engines-matrix.md) holds: every cell it marks ✓ trains on 2 CPU processes with
the feature acting, and every cell it marks refused is one line, exit 2, before any process group.

The cells come from the engines' declared `capabilities`, so a new engine or feature is tested here as soon as it is
declared. The trainings run in one torchrun job, on the 16-weight linear regression of tests/tasks/, with the
features of a column combined into as few runs as their config keys allow (`GROUPS`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cli_in_process, metrics, train_in_one_job

from largebatch.engine import engines
from largebatch.engine.features import FEATURES, Feature, cell
from largebatch.engine.matrix import columns, render

USES = {
    "noise": ("train.noise_scale=true",),
    "gns": ("batch.schedule=gns", "batch.start_size=32", "train.noise_scale=true"),
    "ramp": ("batch.schedule=ramp", "batch.start_size=32", "batch.ramp_samples=256"),
    "steps": ("batch.schedule=steps", "batch.thresholds=0:32,64:64,192:128"),
    "auto": ("batch.micro_size=auto", "batch.memory_limit=3KiB"),
    "bf16": ("train.precision=bf16",),
    "fp16": ("train.precision=fp16", "train.fp16_init_scale=1024"),
    "layerwise": ("optim.name=lars",),
    "muon": (
        "optim.name=muon",
        "optim.lr=0.001",
        "model.name=linreg:hidden_model",
        "model.args={hidden: 8}",
    ),
    "groups": (
        "optim.groups=[{match: matrix, name: lars}, {match: '*', name: sgd}]",
        "model.name=linreg:hidden_model",
        "model.args={hidden: 8}",
    ),
    "syncbatch": ("model.norm=syncbatch",),
    "cbs": ("train.cbs_every=2", "train.cbs_sizes=[32,64]", "train.cbs_examples=64"),
    "compile": ("train.compile=aot_eager",),
}
"""Per feature id: the overrides that use it (the first is the feature's own key)."""
GROUPS = (
    ("noise", "gns", "fp16", "layerwise"),
    ("ramp", "bf16", "cbs"),
    ("auto",),
    ("muon", "steps", "compile"),
    ("groups",),
)
"""Features that can share one training (a column trains one run per group holding a feature it supports): ramp,
steps and gns are all batch.schedule, fp16 and bf16 both train.precision, micro_size=auto takes a constant schedule
(and train.cbs_every a fixed micro-batch), and Muon and optim.groups need a model with a hidden matrix (and
optim.name for themselves); steps rides with Muon (alone where Muon is refused), train.compile goes with any."""
LINREG = (
    f"--config={ROOT / 'tests/tasks/linreg.yaml'}",
    "data.args={sigma: 8.0, size: 2048}",
    "train.noise_scale=false",
    "batch.global_size=128",
    "batch.micro_size=16",
    "train.steps=4",
)
"""B_simple = 1041 (tests/tasks/linreg.py): gns grows the batch from 32 as soon as its average spans its window (11
steps); 4 × 128 examples per run."""


def _column_overrides(heading: str) -> tuple[str, ...]:
    """`engine.name` and, where the engine has several columns, the setting that selects this one."""
    ((name, engine),) = [
        (name, engine)
        for name, engine in engines().items()
        if heading == name or heading in engine.columns
    ]
    return (f"engine.name={name}", *([engine.columns[heading]] if engine.columns else []))


def _cpu_cells() -> list[tuple[str, Feature]]:
    """(column heading, feature) of every cell that runs on CPU."""
    return [
        (heading, feature)
        for heading, engine, index in columns()
        for feature in FEATURES
        if cell(engine, feature, index).runs == "cpu" and not feature.needs_cuda
    ]


def _refused_cells() -> list[tuple[str, Feature]]:
    """(column heading, feature) of every cell refused here: refused everywhere, or CUDA only on a machine without."""
    refused = ("refused",) if torch.cuda.is_available() else ("refused", "cuda")
    return [
        (heading, feature)
        for heading, engine, index in columns()
        for feature in FEATURES
        if cell(engine, feature, index).runs in refused
    ]


def _runs() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """{run name: (its features, its CLI arguments)}: per column, one run per group of features it supports."""
    supported = {(heading, feature.id) for heading, feature in _cpu_cells()}
    runs = {}
    for heading, _, _ in columns():
        for number, group in enumerate(GROUPS):
            ids = tuple(i for i in group if (heading, i) in supported)
            if ids:
                args = (*LINREG, *_column_overrides(heading))
                runs[f"{heading}-{number}"] = (ids, (*args, *(o for i in ids for o in USES[i])))
    return runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("feature_matrix")
    train_in_one_job(base, {name: args for name, (_, args) in _runs().items()})
    return base


def _acted(feature: str, records: list[dict], run: Path) -> bool:
    """Whether the metrics (or config.yaml's derived values) show the feature at work."""
    sizes = [r["global_batch"] for r in records]
    per_rank = [r["micro_batch"] * r["accum_steps"] for r in records]
    return {
        "noise": any("gns" in r for r in records),
        "gns": sizes[0] == 32 and max(sizes) > 32,
        "ramp": sizes[0] == 32 and sizes == sorted(sizes) and sizes[-1] == 128,
        "steps": sizes == [32, 32, 64, 64, 128, 128, 128],
        "auto": all(r["micro_batch"] < share for r, share in zip(records, per_rank)),
        "bf16": all(r["loss"] == r["loss"] for r in records),
        "fp16": all("loss_scale" in r for r in records),
        "layerwise": all(any(k.startswith("trust_ratio/") for k in r) for r in records),
        "cbs": (run / "cbs.jsonl").is_file(),
        "compile": bool(_derived(run).get("compiled")),
    }.get(feature) or _split(run) == {
        "muon": [(1, 128), (1, 8)],  # Muon: the hidden matrix; AdamW: the head
        "groups": [(1, 128), (1, 8)],  # lars: the hidden matrix; sgd: the rest
    }.get(feature)


def _derived(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["derived"]


def _split(run: Path) -> list[tuple[int, int]]:
    """(tensors, parameters) of each optimizer, in order, from config.yaml's derived.optimizer_split."""
    split = _derived(run).get("optimizer_split", [])
    parts = split.values() if isinstance(split, dict) else split
    return [(part["tensors"], part["params"]) for part in parts]


@pytest.mark.parametrize(
    ("heading", "feature"), _cpu_cells(), ids=[f"{h}-{f.id}" for h, f in _cpu_cells()]
)
def test_a_supported_cell_trains(trained: Path, heading: str, feature: Feature) -> None:
    run = next(
        name
        for name, (ids, _) in _runs().items()
        if name.startswith(f"{heading}-") and feature.id in ids
    )
    summary = json.loads((trained / run / "summary.json").read_text())
    assert summary["steps"] > 0
    assert _acted(feature.id, metrics(trained / run), trained / run), (
        f"{feature.name} did not act in {run}"
    )


@pytest.mark.parametrize(
    ("heading", "feature"), _refused_cells(), ids=[f"{h}-{f.id}" for h, f in _refused_cells()]
)
def test_a_refused_cell_is_one_line_before_any_process_group(
    heading: str, feature: Feature
) -> None:
    ((engine, index),) = [(e, i) for h, e, i in columns() if h == heading]
    result = cli_in_process(
        "plan",
        "batch.global_size=128",
        "batch.micro_size=16",
        *_column_overrides(heading),
        *USES[feature.id],
        "--world-size",
        "2",
        "--examples",
        "4096",
    )
    assert result.returncode == 2 and not torch.distributed.is_initialized()
    setting = feature.key if feature.values in ((True,), None) else USES[feature.id][0]
    assert result.stderr == f"largebatch: error: {setting} {cell(engine, feature, index).reason}\n"


def test_every_declared_capability_names_a_feature_and_covers_every_column() -> None:
    ids = {feature.id for feature in FEATURES}
    for name, engine in engines().items():
        for feature, declared in engine.capabilities.items():
            assert feature in ids, f"{name} declares {feature!r}, not one of {sorted(ids)}"
            if isinstance(declared, tuple):
                assert len(declared) == len(engine.columns), (
                    f"{name}: {feature} needs a cell per column"
                )


def test_every_feature_has_its_overrides_and_a_group() -> None:
    ids = {feature.id for feature in FEATURES}
    assert set(USES) == ids
    assert {i for group in GROUPS for i in group} == ids - {f.id for f in FEATURES if f.needs_cuda}


def test_the_engines_matrix_is_up_to_date() -> None:
    assert (ROOT / "docs/engines-matrix.md").read_text() == render(), (
        "docs/engines-matrix.md is stale; regenerate it with `python -m largebatch.engine.matrix` (or "
        "`make docs`) and commit it"
    )


def test_every_cuda_only_cell_names_a_gpu_test_that_exists() -> None:
    for heading, engine, index in columns():
        for feature in FEATURES:
            named = cell(engine, feature, index).gpu_test
            if named:
                path, _, test = named.partition("::")
                function = test.split("[")[0]
                assert f"def {function}(" in (ROOT / path).read_text(), f"{heading}: {named}"
