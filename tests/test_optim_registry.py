"""The optimizer registry: names, parameter groups, the torch-optimizer passthrough, trust ratios in the metrics."""

from __future__ import annotations

import pytest
import torch_optimizer
from conftest import cli, metrics, train

from largebatch import models, optim
from largebatch.config import ModelConfig, OptimConfig
from largebatch.data import Data
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS


def _model():
    cfg = ModelConfig(name="resnet", norm="batch", width=8, depth=1)
    return models.build(cfg, Data(None, None, input_shape=(1, 8, 8), num_classes=10))


@pytest.mark.parametrize(
    "name, cls, clip",
    [
        ("sgd", "SGD", None),
        ("adamw", "AdamW", None),
        ("lars", LARS, False),
        ("larc", LARS, True),
        ("lamb", LAMB, None),
        ("lambc", LAMB, 10.0),
        ("torch_optimizer:Lamb", torch_optimizer.Lamb, None),
    ],
)
def test_every_registered_name_builds_its_optimizer(name, cls, clip):
    opt = optim.build(_model(), OptimConfig(name=name), lr=0.1)
    assert type(opt).__name__ == cls if isinstance(cls, str) else type(opt) is cls
    if clip is not None:
        assert opt.defaults["trust_clip"] == clip


def test_biases_and_norm_weights_get_no_decay_and_no_adaptation():
    model = _model()
    groups = optim.param_groups(model, OptimConfig(weight_decay=5e-4))
    decayed, excluded = groups
    assert (
        decayed["weight_decay"],
        decayed["adapt"],
        excluded["weight_decay"],
        excluded["adapt"],
    ) == (5e-4, True, 0.0, False)
    assert all(p.ndim > 1 for p in decayed["params"]) and all(
        p.ndim <= 1 for p in excluded["params"]
    )
    assert len(decayed["params"]) + len(excluded["params"]) == len(list(model.parameters()))


def test_exclude_patterns_and_the_1d_rule_are_configurable():
    model = _model()
    names = dict((id(p), n) for n, p in model.named_parameters())
    only_patterns = optim.param_groups(
        model, OptimConfig(exclude_1d=False, exclude=["*.shortcut.*", "0.weight"])
    )
    expected = {n for n in names.values() if n == "0.weight" or ".shortcut." in n}
    assert len(expected) == 4 and {names[id(p)] for p in only_patterns[1]["params"]} == expected
    everything_1d = optim.param_groups(model, OptimConfig(exclude=["0.*"]))
    assert "0.weight" in {names[id(p)] for p in everything_1d[1]["params"]}


def test_torch_optimizer_options_pass_through():
    opt = optim.build(
        _model(),
        OptimConfig(name="torch_optimizer:Lamb", options={"clamp_value": 7.0, "debias": True}),
        0.1,
    )
    assert opt.clamp_value == 7.0 and opt.debias is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("optim.name=torch_optimizer:Lamm",), "did you mean 'Lamb'"),
        (
            ("optim.name=torch_optimizer:Lamb", "optim.options={foo: 1}"),
            "torch_optimizer.Lamb has no option 'foo'",
        ),
        (
            ("optim.name=lars", "optim.options={foo: 1}"),
            "optim.options is ignored with optim.name=lars",
        ),
        (
            ("optim.name=lars", "optim.impl=fast"),
            "optim.impl='fast' is not one of auto, fused, foreach",
        ),
        (("optim.name=lamb", "optim.options=5"), "optim.options=5 must be a mapping"),
    ],
)
def test_bad_optimizer_settings_are_one_line_errors(overrides, message):
    result = cli("train", *overrides)
    assert (
        result.returncode == 2
        and message in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )


def test_every_optimizer_named_in_the_options_table_is_registered():
    named = {name for users in optim.OPTIONS.values() for name in users}
    assert named == {*optim.OPTIMIZERS, *optim.MODEL_OPTIMIZERS, f"{optim.TORCH_OPTIMIZER}<Class>"}
    assert all(hasattr(OptimConfig(), key) for key in optim.OPTIONS)


def test_lars_trust_ratios_are_logged_per_adapted_layer(run_dirs):
    run = run_dirs("lars")
    train(
        run,
        "data.size=512",
        "model.width=32",
        "optim.name=lars",
        "optim.weight_decay=1e-4",
        "train.steps=4",
        "train.log_every=2",
    )
    record = metrics(run)[-1]
    ratios = {k: v for k, v in record.items() if k.startswith("trust_ratio/")}
    assert set(ratios) == {"trust_ratio/1.weight", "trust_ratio/4.weight", "trust_ratio/7.weight"}
    assert all(0 < v < 1 for v in ratios.values())
