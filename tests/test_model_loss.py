"""Models that compute their own loss (train.loss=model) and builders told what the data knows.

nanoGPT's model.py as written (tests/tasks/nanogpt.py) and a Hugging Face causal LM train from a config line, no
wrapper; the model's mean loss becomes a sum by the count of valid targets, so the global-batch mean stays exact
whatever the split, also on padded data."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch
from conftest import (
    ROOT,
    cli_in_process,
    metrics,
    train_in_one_job,
    write_jsonl,
    write_tiny_gpt2,
    write_tokens,
)

from largebatch import config, task

CONFIG = str(ROOT / "tests" / "tasks" / "nanogpt.yaml")
VOCAB = 65
"""meta.pkl's vocabulary: more than the 60 distinct tokens the files hold, so it must come from meta.pkl."""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A nanoGPT-format folder: uint16 train.bin and val.bin, and meta.pkl with vocab_size, itos, stoi."""
    folder = tmp_path_factory.mktemp("tokens")
    write_tokens(folder / "train.bin", 8000, vocab=60)
    write_tokens(folder / "val.bin", 1000, vocab=60, seed=1)
    chars = [chr(40 + i) for i in range(VOCAB)]
    meta = {
        "vocab_size": VOCAB,
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """JSON lines of 3 to 40 characters: micro-batches with different numbers of valid targets."""
    return write_jsonl(tmp_path_factory.mktemp("jsonl") / "text.jsonl", 400)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return write_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


def nanogpt_on(data: str, path, *extra: str) -> tuple[str, ...]:
    """Overrides of nanogpt.yaml for `tokens` data, or padded `jsonl` bytes (nanoGPT's loss ignores -1)."""
    if data == "tokens":
        return (f"--config={CONFIG}", f"data.path={path}", *extra)
    jsonl = ("data.name=jsonl", f"data.path={path}", "data.context=48", "train.ignore_index=-1")
    return (f"--config={CONFIG}", *jsonl, *extra)


def built(*overrides: str) -> tuple[task.Task, torch.nn.Module]:
    """The task and a model, as `largebatch train --config nanogpt.yaml OVERRIDES` builds them."""
    cfg = config.load(CONFIG, list(overrides))
    built_task = task.build(cfg)
    torch.manual_seed(0)
    return built_task, built_task.build_model()


@pytest.fixture(scope="module")
def runs(tokens, padded, tiny_gpt2, tmp_path_factory):
    """nanoGPT on tokens and on padded jsonl, and an hf: GPT-2 on padded jsonl, all with train.loss=model:
    2 processes × micro 16 × accum 2, and 1 process × micro 32 × accum 2 (one torchrun job each)."""
    base = tmp_path_factory.mktemp("runs")
    hf = (
        f"--config={CONFIG}",
        "data.name=jsonl",
        f"data.path={padded}",
        "data.context=48",
        f"model.name=hf:{tiny_gpt2}",
        "model.args={}",
    )
    cases = {
        "tokens": nanogpt_on("tokens", tokens),
        "jsonl": nanogpt_on("jsonl", padded),
        "hf": hf,
    }
    train_in_one_job(base, {f"{k}-2x16": (*v, "batch.micro_size=16") for k, v in cases.items()}, 2)
    train_in_one_job(base, {f"{k}-1x32": (*v, "batch.micro_size=32") for k, v in cases.items()}, 1)
    return base


@pytest.mark.parametrize("case", ["tokens", "jsonl", "hf"])
def test_two_processes_equal_one_with_the_models_own_loss(runs, case):
    """2 × micro 16 × accum 2 ≡ 1 × micro 32 × accum 2 per step within 1e-5: on token windows, on padded jsonl
    (micro-batches with different counts of valid targets) and for a Hugging Face causal LM."""
    two, one = metrics(runs / f"{case}-2x16"), metrics(runs / f"{case}-1x32")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], abs=1e-5)
    assert two[-1]["loss"] < two[0]["loss"]


def test_the_count_makes_padded_micro_batches_exact_where_their_mean_would_not(padded):
    """Σ (mean × count) ÷ Σ count over micro-batches of 8 gives the gradient of the whole batch of 32; a mean of
    per-micro-batch means does not, once micro-batches hold different numbers of valid targets."""
    jsonl, model = built(*nanogpt_on("jsonl", padded)[1:])
    micro = [task.take(jsonl.train, range(i, i + 8)) for i in range(0, 32, 8)]

    def gradient(loss_of_batches) -> torch.Tensor:
        model.zero_grad()
        loss_of_batches([jsonl.score(model, *batch) for batch in micro]).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = jsonl.score(model, *task.take(jsonl.train, range(32)))
    model.zero_grad()
    (whole.total / whole.count).backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    counted = gradient(lambda s: sum(x.total for x in s) / sum(x.count for x in s))
    per_micro_mean = gradient(lambda s: sum(x.total / x.count for x in s) / len(s))
    assert len({int(jsonl.score(model, *batch).count) for batch in micro}) > 1
    assert torch.allclose(counted, reference, rtol=1e-4, atol=1e-7)
    assert (per_micro_mean - reference).norm() > 0.01 * reference.norm()


@pytest.mark.parametrize("data", ["jsonl", "tokens"])
def test_the_hf_models_own_loss_is_the_counted_cross_entropy_of_the_targets(
    data, padded, tokens, tiny_gpt2
):
    """The targets are already shifted: given as shift_labels (with labels) the model does not shift them again
    and its loss × count equals our summed cross-entropy, on padded input mappings and on token tensors; given
    as labels alone it would score token t+2."""
    where = ("data.name=jsonl", f"data.path={padded}", "data.context=48")
    if data == "tokens":
        where = (f"data.path={tokens}",)
    own, model = built(*where, f"model.name=hf:{tiny_gpt2}", "model.args={}")
    inputs, targets = task.take(own.train, range(8))
    assert (targets == -100).any() == (data == "jsonl")
    with torch.no_grad():
        total, count, _ = own.score(model, inputs, targets)
        logits = task.forward(model, inputs).logits
        expected, expected_count = task.CrossEntropy()(logits, targets)
        shifted_twice = (
            model(**inputs, labels=targets) if data == "jsonl" else model(inputs, labels=targets)
        )
    assert int(count) == int(expected_count) == int((targets != -100).sum())
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(shifted_twice.loss) - float(expected / expected_count)) > 1e-3


def test_an_hf_config_vocabulary_below_the_datas_is_one_line(tokens, tiny_gpt2, tmp_path):
    result = cli_in_process(
        "train",
        "--config",
        CONFIG,
        f"data.path={tokens}",
        f"run.dir={tmp_path / 'run'}",
        f"model.name=hf:{tiny_gpt2}",
        "model.args={vocab_size: 50}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert (
        f"has vocab_size 50, less than the data's {VOCAB}; set model.args.vocab_size={VOCAB}"
        in (result.stderr)
    )


def test_nanogpts_config_dataclass_gets_vocab_size_from_meta_pkl_and_block_size_from_the_context(
    tokens,
):
    _, model = built(f"data.path={tokens}")
    assert (model.config.vocab_size, model.config.block_size, model.config.n_layer) == (
        VOCAB,
        16,
        1,
    )
    assert model.transformer.wte.weight is model.lm_head.weight


def test_a_builder_gets_vocab_size_and_context_from_a_tokenizer(padded, tmp_path, monkeypatch):
    """A builder asking for vocab_size and context by name gets the local tokenizer's len() and data.context."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "large", "batch", "noise", "scale", "warmup", "lamb", "lars", "step"]
    wordlevel = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordlevel, unk_token="[UNK]", pad_token="[PAD]"
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "asks.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def build(vocab_size, context, width=8):
            model = nn.Embedding(vocab_size, width)
            model.asked = (vocab_size, context)
            return model
    """)
    )
    monkeypatch.chdir(tmp_path)
    data = (
        "data.name=jsonl",
        f"data.path={padded}",
        "data.context=12",
        f"data.tokenizer={tmp_path / 'tokenizer'}",
    )
    _, model = built(*data, "model.name=asks:build", "model.args={}")
    assert model.asked == (len(tokenizer), 12) == (len(words), 12)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("vocab_size: 50", f"model.args.vocab_size=50 is less than the data's vocabulary, {VOCAB}"),
        (
            "block_size: 8",
            "model.args.block_size=8 is less than the data's sequence length (data.context), 16",
        ),
    ],
)
def test_model_args_that_contradict_the_data_are_one_line(arg, message, tokens, tmp_path):
    result = cli_in_process(
        "train",
        "--config",
        CONFIG,
        f"data.path={tokens}",
        f"run.dir={tmp_path / 'run'}",
        f"model.args={{n_layer: 1, n_head: 2, n_embd: 32, {arg}}}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert message in result.stderr


def test_a_model_returning_logits_and_loss_without_train_loss_points_at_train_loss_model(
    tokens, tmp_path
):
    result = cli_in_process(
        "train",
        "--config",
        CONFIG,
        f"data.path={tokens}",
        f"run.dir={tmp_path / 'run'}",
        "train.loss=null",
    )
    assert result.returncode == 2
    assert "set train.loss=model" in result.stderr


def test_train_loss_neither_model_nor_a_callable_is_one_line(tmp_path):
    result = cli_in_process("train", f"run.dir={tmp_path / 'run'}", "train.loss=modle")
    assert result.returncode == 2
    assert "train.loss=modle is neither model" in result.stderr


def test_a_meta_pkl_that_would_run_code_is_refused_in_one_line(tmp_path):
    """meta.pkl is read as plain values only: unpickling an object (here os.system) would run code."""
    import os

    write_tokens(tmp_path / "train.bin", 400)
    write_tokens(tmp_path / "val.bin", 100)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "hook": os.system}))
    result = cli_in_process(
        "train", "--config", CONFIG, f"data.path={tmp_path}", f"run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2
    assert "meta.pkl is not a pickled dict of plain values" in result.stderr
