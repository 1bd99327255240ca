"""Real models on real data: torchvision and Hugging Face models, image folders, token files, padded text, and a
user's own model, dataset and loss, with the global-batch contract intact (all data generated here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import textwrap

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("transformers")

from conftest import (
    ROOT,
    cli,
    cli_in_process,
    kill_one_worker_mid_run,
    metrics,
    torchrun,
    train_in_one_job,
    write_jsonl,
    write_tiny_gpt2,
    write_tokens,
)

from largebatch.bench.data import write_image_folder


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four classes of 48 generated training images (JPEG and PNG) and 8 validation images each."""
    return write_image_folder(
        tmp_path_factory.mktemp("images"), classes=4, per_class=48, val_per_class=8
    )


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return write_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


RESNET18 = (
    "data.name=imagefolder",
    "data.image_size=32",
    "model.name=torchvision:resnet18",
    "optim.lr=0.05",
    "optim.scaling=none",
    "batch.global_size=8",
    "train.log_every=1",
    "run.threads=1",
)


def resnet18(images) -> tuple[str, ...]:
    return (*RESNET18, f"data.path={images}", "train.steps=6", "batch.micro_size=4")


def kill_config(images) -> tuple[str, ...]:
    return (
        *RESNET18,
        f"data.path={images}",
        "batch.global_size=16",
        "train.steps=12",
        "train.checkpoint_every=4",
    )


def hf_causal(tokens, tiny_gpt2) -> tuple[str, ...]:
    return (
        "data.name=tokens",
        f"data.path={tokens}",
        "data.context=32",
        f"model.name=hf:{tiny_gpt2}",
        "optim.name=adamw",
        "optim.lr=3e-3",
        "batch.global_size=16",
        "batch.micro_size=8",
        "train.steps=8",
        "train.log_every=1",
        "run.threads=1",
    )


def padded_text(padded, tiny_gpt2, micro: int) -> tuple[str, ...]:
    return (
        "data.name=jsonl",
        f"data.path={padded}",
        "data.context=48",
        f"model.name=hf:{tiny_gpt2}",
        "optim.name=adamw",
        "optim.lr=3e-3",
        "batch.global_size=8",
        "train.steps=6",
        "train.log_every=1",
        "run.threads=1",
        f"batch.micro_size={micro}",
    )


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("jsonl") / "text.jsonl", 400)


@pytest.fixture(scope="module")
def mean_loss(tmp_path_factory):
    """A config whose loss averages per micro-batch (as Lightning does), with its module beside it."""
    folder = tmp_path_factory.mktemp("mean")
    (folder / "mean_loss.py").write_text(
        textwrap.dedent("""
        import torch.nn.functional as F

        def per_micro_batch_mean(output, targets):
            loss = F.cross_entropy(output.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            return loss, 1
    """)
    )
    (folder / "mean.yaml").write_text("train:\n  loss: mean_loss:per_micro_batch_mean\n")
    return folder / "mean.yaml"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens") / "train.bin", 20_000)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, images, tiny_gpt2, tokens, padded):
    """This file's 2-process trainings, one after another in one torchrun job (one start, one import)."""
    base = tmp_path_factory.mktemp("two_processes")
    quiet = ("logging.progress=false",)
    train_in_one_job(
        base,
        {
            "resnet18": (*resnet18(images), *quiet),
            "hf": (*hf_causal(tokens, tiny_gpt2), *quiet),
            "padded": (*padded_text(padded, tiny_gpt2, 4), *quiet),
            "uninterrupted": (*kill_config(images), *quiet),
        },
    )
    return base


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, images, tiny_gpt2, tokens, padded, mean_loss, user_task, corpus):
    """This file's 1-process trainings, one after another in one process."""
    base = tmp_path_factory.mktemp("one_process")
    quiet = ("logging.progress=false",)
    mean = f"--config={mean_loss}"
    train_in_one_job(
        base,
        {
            "resnet18": (*resnet18(images), "data.workers=2", *quiet),
            "hf": (*hf_causal(tokens, tiny_gpt2), *quiet),
            "padded_accum": (*padded_text(padded, tiny_gpt2, 4), *quiet),
            "padded_whole": (*padded_text(padded, tiny_gpt2, 8), *quiet),
            "mean_accum": (mean, *padded_text(padded, tiny_gpt2, 4), *quiet),
            "mean_whole": (mean, *padded_text(padded, tiny_gpt2, 8), *quiet),
            "goyal": (
                f"--config={ROOT / 'configs/goyal-resnet50-imagenet.yaml'}",
                *goyal_recipe(images),
            ),
            "gpt2": (f"--config={ROOT / 'configs/lamb-gpt2.yaml'}", *lamb_gpt2_recipe(tokens)),
            "plan": (*PLAN_RUN, *quiet),
            "usertask": (f"--config={user_task / 'cli.yaml'}", *quiet),
            "other_data": (*other_data(corpus), "train.steps=2", *quiet),
        },
        nproc=1,
    )
    return base


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_torchvision_resnet18_on_an_image_folder_two_processes_equal_one_with_accumulation(
    two_processes, one_process
):
    """Random crops and flips on, BatchNorm in the model: the same micro-batches in the same order (2 × micro 4 vs
    1 × micro 4 × accum 2) give the same per-step losses, also with DataLoader workers on one side."""
    two, one = summary(two_processes / "resnet18"), summary(one_process / "resnet18")
    assert (two["world_size"], one["accum_steps"]) == (2, 2)
    assert losses(two_processes / "resnet18") == pytest.approx(
        losses(one_process / "resnet18"), abs=1e-5
    )
    assert set(one["eval"]) == {"loss", "accuracy"}


def test_hf_causal_lm_on_a_token_file_two_processes_equal_one_with_accumulation(
    two_processes, one_process
):
    assert summary(two_processes / "hf")["world_size"] == 2
    assert summary(one_process / "hf")["accum_steps"] == 2
    one = losses(one_process / "hf")
    assert losses(two_processes / "hf") == pytest.approx(one, abs=1e-5)
    assert one[-1] < one[0]


def test_padded_variable_length_text_gives_the_same_steps_whatever_the_split(
    two_processes, one_process
):
    """The loss is Σ token losses ÷ the all-reduced count of real tokens in the global batch: 2 × micro 4,
    1 × micro 4 × accum 2 and 1 × micro 8 take the same steps, although their batches are padded differently."""
    two = losses(two_processes / "padded")
    accum = losses(one_process / "padded_accum")
    whole = losses(one_process / "padded_whole")
    assert summary(two_processes / "padded")["world_size"] == 2
    assert summary(one_process / "padded_accum")["accum_steps"] == 2
    assert len(whole) == 6
    assert two == pytest.approx(whole, abs=1e-5)
    assert accum == pytest.approx(whole, abs=1e-5)


def test_a_mean_per_micro_batch_would_break_that_equivalence(one_process):
    """The bug this design prevents: a loss that averages per micro-batch (as Lightning does) is not the mean over
    the global batch once batches are padded, so accumulation changes the steps."""
    accum = losses(one_process / "mean_accum")
    whole = losses(one_process / "mean_whole")
    assert summary(one_process / "mean_accum")["accum_steps"] == 2
    assert max(abs(a - b) for a, b in zip(accum, whole)) > 1e-3


USER_MODULE = '''
"""A user's own task: dict inputs, a model whose forward takes them by name, a loss that counts its terms."""
import torch
import torch.nn.functional as F
from torch import nn


class Quadrants(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = (self.x[:, 0] > 0).long() + 2 * (self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i]}, self.y[i]


def build_data(n=512, seed=0):
    return Quadrants(n, seed), Quadrants(128, seed + 1)


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))

    def forward(self, features):
        return self.body(features)


def build_model(hidden=16):
    return Net(hidden)


def loss(output, targets):
    return F.cross_entropy(output, targets, reduction="sum"), targets.numel()
'''

API_SCRIPT = """
import sys

import largebatch
import usertask

train, held = usertask.build_data(n=512)
summary = largebatch.train(sys.argv[1], [f"run.dir={sys.argv[2]}", "logging.progress=false"],
                           model=usertask.build_model, train_data=train, eval_data=held, loss=usertask.loss)
print("params", summary["params_sha256"])
"""

USER_CONFIG = """
data: {name: "usertask:build_data", args: {n: 512}}
model: {name: "usertask:build_model", args: {hidden: 12}}
train: {loss: "usertask:loss", steps: 12, log_every: 1}
batch: {global_size: 64}
optim: {lr: 0.2}
run: {threads: 1}
"""


@pytest.fixture(scope="module")
def user_task(tmp_path_factory):
    """usertask.py, a config naming its factories, and an API script, in a folder of their own."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "usertask.py").write_text(USER_MODULE)
    (folder / "cli.yaml").write_text(USER_CONFIG)
    (folder / "api.yaml").write_text(
        "\n".join(line for line in USER_CONFIG.splitlines() if not line.startswith("data"))
        .replace('name: "usertask:build_model", ', "")
        .replace('loss: "usertask:loss", ', "")
    )
    (folder / "train_api.py").write_text(API_SCRIPT)
    return folder


def test_a_user_module_trains_the_same_through_the_cli_and_the_python_api(
    user_task, one_process, run_dirs
):
    """The config's folder is importable (the config's run is trained in the one-process job, whose script and working
    directory are elsewhere); the API seeds the user's builder like the CLI, so weights match bit for bit (the API
    trains in this process, whose global RNG is wherever earlier tests left it); under torchrun the API runs the
    same job on 2 processes."""
    import largebatch

    cli_summary = summary(one_process / "usertask")
    assert cli_summary["eval"]["accuracy"] > 0.5
    spec = importlib.util.spec_from_file_location("usertask", user_task / "usertask.py")
    usertask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(usertask)
    train_set, held = usertask.build_data(n=512)
    api = largebatch.train(
        user_task / "api.yaml",
        [f"run.dir={run_dirs('api')}", "logging.progress=false"],
        model=usertask.build_model,
        train_data=train_set,
        eval_data=held,
        loss=usertask.loss,
    )
    assert api["params_sha256"] == cli_summary["params_sha256"]
    assert losses(run_dirs("api")) == losses(one_process / "usertask")
    two = subprocess.run(
        [
            *torchrun(2),
            str(user_task / "train_api.py"),
            str(user_task / "api.yaml"),
            str(run_dirs("api2")),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((run_dirs("api2") / "summary.json").read_text())["world_size"] == 2
    assert losses(run_dirs("api2")) == pytest.approx(losses(one_process / "usertask"), abs=1e-5)


def test_kill_9_mid_epoch_on_an_image_folder_ends_with_the_same_weights(
    images, two_processes, run_dirs
):
    """torchrun --max-restarts 1 restarts the group after a worker's SIGKILL; the resumed run draws the same crops
    (seeded per example) and ends bit-identical to an uninterrupted one (trained in the 2-process job)."""
    reference = summary(two_processes / "uninterrupted")
    assert (reference["world_size"], reference["steps"]) == (2, 12)
    run = run_dirs("killed")
    kill_one_worker_mid_run(
        run, kill_config(images), 6, "step_00000004"
    )  # epoch 1 of 12 steps: resumes at step 4
    assert summary(run)["params_sha256"] == reference["params_sha256"]


def test_each_example_draws_its_crop_from_seed_epoch_and_index(images):
    """Not from the global RNG, a worker's RNG or the order of loading; and a new epoch draws a new crop."""
    from largebatch.data import imagefolder

    train_set = imagefolder.build(str(images), 0.2, 32, 0).train
    before = torch.get_rng_state()
    first = train_set[(0, 1, 5)][0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    assert torch.equal(train_set[(0, 1, 5)][0], first)
    assert not torch.equal(train_set[(0, 2, 5)][0], first)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=3, num_workers=2, sampler=[(0, 1, 7), (0, 1, 6), (0, 1, 5)]
    )
    assert torch.equal(next(iter(loader))[0][2], first)


def other_data(corpus) -> tuple[str, ...]:
    return (
        "data.name=tokens",
        f"data.path={corpus}",
        "data.context=16",
        "model.name=gpt",
        "model.width=32",
        "model.depth=1",
        "model.heads=2",
        "batch.global_size=16",
        "train.checkpoint_every=2",
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The token file of test_a_checkpoint_of_other_data_is_refused, which rewrites it (no other test reads it)."""
    return write_tokens(tmp_path_factory.mktemp("corpus") / "corpus.bin", 8000)


def test_a_checkpoint_of_other_data_is_refused(one_process, corpus):
    """The run of 2 steps is trained in the one-process job; the refusal ends in job.prepare, before any process
    group, so it runs in this process."""
    run = one_process / "other_data"
    assert (run / "checkpoints" / "step_00000002").exists()
    write_tokens(corpus, 8000, seed=1)  # same size, other content
    result = cli_in_process("train", f"run.dir={run}", *other_data(corpus), "train.steps=4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was trained with data.fingerprint=" in result.stderr


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def one_class(tmp_path):
    return write_image_folder(tmp_path / "one", classes=1, per_class=4)


def odd_token_file(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    return tmp_path / "odd.bin"


IMAGES = (
    "data.name=imagefolder",
    "data.image_size=32",
    "model.name=torchvision:resnet18",
    "batch.global_size=16",
)
ERRORS = {
    "missing_path": (
        lambda t, i: ["data.name=imagefolder"],
        "data.name=imagefolder needs data.path",
    ),
    "no_such_path": (
        lambda t, i: ["data.name=imagefolder", f"data.path={t / 'nope'}"],
        "does not exist",
    ),
    "empty_folder": (
        lambda t, i: [*IMAGES, f"data.path={empty_folder(t)}"],
        "has no class sub-folders",
    ),
    "one_class": (
        lambda t, i: [*IMAGES, f"data.path={one_class(t)}"],
        "classification needs at least 2",
    ),
    "token_size": (
        lambda t, i: ["data.name=tokens", f"data.path={odd_token_file(t)}", "model.name=gpt"],
        "has 3 bytes, not a multiple of 2 (data.dtype=uint16)",
    ),
    "no_torchvision_model": (
        lambda t, i: [*IMAGES, f"data.path={i}", "model.name=torchvision:resnet18x"],
        "is not a torchvision model; did you mean torchvision:resnet18?",
    ),
    "missing_callable": (
        lambda t, i: [f"data.path={i}", *IMAGES, "model.name=largebatch.models.mlp:missing"],
        "largebatch.models.mlp has no 'missing' (it has build)",
    ),
    "no_module": (
        lambda t, i: [*IMAGES, f"data.path={i}", "model.name=nosuch_pkg.models:build"],
        "cannot import nosuch_pkg.models",
    ),
    "argument_not_taken": (
        lambda t, i: [*IMAGES, f"data.path={i}", "model.args={depth: 50}"],
        "does not fit torchvision:resnet18 (ResNet.__init__() got an unexpected keyword argument",
    ),
    "user_argument_not_taken": (
        lambda t, i: ["model.name=largebatch.models.mlp:build", "model.args={colour: 1}"],
        "model.args has colour, which largebatch.models.mlp:build does not take "
        "(it takes input_shape, num_classes, width, depth, norm)",
    ),
    "output_does_not_fit": (
        lambda t, i: [*IMAGES, f"data.path={i}", "model.args={num_classes: 2}"],
        "the model outputs 2 classes but the data has 4",
    ),
    "hf_unknown_field": (
        lambda t, i: ["data.name=text", "model.name=hf:gpt2", "model.args={n_layerz: 1}"],
        "model.args has n_layerz, which GPT2Config does not have",
    ),
}


@pytest.mark.parametrize("name", ERRORS)
def test_data_and_model_mistakes_are_one_line_errors(name, images, tmp_path):
    make_args, message = ERRORS[name]
    result = cli_in_process("train", f"run.dir={tmp_path / 'run'}", *make_args(tmp_path, images))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    assert message in result.stderr


@pytest.mark.parametrize(
    "recipe, examples", [("goyal-resnet50-imagenet", 1281167), ("lamb-gpt2", 8800000)]
)
@pytest.mark.parametrize("world", [8, 256])
def test_recipes_plan_for_8_and_256_gpus(recipe, examples, world):
    """In this process (test_train.py runs `largebatch plan` as a real process)."""
    result = cli_in_process(
        "plan",
        "--config",
        f"configs/{recipe}.yaml",
        "--world-size",
        str(world),
        "--examples",
        str(examples),
    )
    assert result.returncode == 0, result.stderr
    plan = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert int(plan["global_batch"]) == int(plan["world_size"]) * int(plan["micro_batch"]) * int(
        plan["accum_steps"]
    )
    if recipe.startswith("goyal"):
        assert (plan["micro_batch"], float(plan["peak_lr"]), plan["warmup_steps"]) == (
            "32",
            3.2,
            "780",
        )


def goyal_recipe(images) -> tuple[str, ...]:
    return (
        f"data.path={images}",
        "data.image_size=32",
        "data.workers=0",
        "batch.global_size=16",
        "batch.micro_size=8",
        "train.epochs=0.5",
        "schedule.warmup_epochs=0.1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.log_every=2",
        "logging.progress=false",
    )


def lamb_gpt2_recipe(tokens) -> tuple[str, ...]:
    return (
        f"data.path={tokens}",
        "data.context=32",
        "model.args={n_layer: 1, n_head: 2, n_embd: 32, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
        "batch.global_size=8",
        "train.steps=3",
        "schedule.warmup_steps=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "logging.progress=false",
    )


def test_goyal_recipe_runs_on_a_tiny_image_folder(one_process):
    done = summary(one_process / "goyal")
    assert done["steps"] == 6 and done["accum_steps"] == 2 and done["final_loss"] > 0


def test_lamb_gpt2_recipe_runs_on_a_tiny_token_file(one_process):
    done = summary(one_process / "gpt2")
    assert done["steps"] == 3 and done["final_loss"] > 0


def test_without_the_optional_extras_hf_and_torchvision_are_one_line_errors(tmp_path, images):
    for module in ("transformers", "torchvision"):
        (tmp_path / "blocked" / module).mkdir(parents=True)
        (tmp_path / "blocked" / module / "__init__.py").write_text(
            "raise ImportError('not installed')"
        )
    env = {"PYTHONPATH": str(tmp_path / "blocked")}
    hf = cli("train", "data.name=text", "model.name=hf:gpt2", env=env)
    assert hf.returncode == 2 and "Traceback" not in hf.stderr
    assert (
        "model.name=hf:<name-or-dir> needs transformers" in hf.stderr
        and "largebatch[hf]" in hf.stderr
    )
    vision = cli(
        "train",
        "data.name=imagefolder",
        f"data.path={images}",
        "model.name=torchvision:resnet18",
        env=env,
    )
    assert vision.returncode == 2 and "Traceback" not in vision.stderr
    assert (
        "data.name=imagefolder needs torchvision" in vision.stderr
        and "largebatch[vision]" in vision.stderr
    )


def test_bench_data_and_find_batch_work_on_an_image_folder(images):
    task = (
        "data.name=imagefolder",
        f"data.path={images}",
        "data.image_size=32",
        "model.name=torchvision:resnet18",
    )
    bench = cli_in_process(
        "bench", "data", *task, "--micro", "4", "--batches", "2", "--repeats", "1", "--workers", "0"
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "ratio ours / plain = " in bench.stdout and "input-bound" in bench.stdout
    found = cli_in_process(
        "find-batch", *task, "batch.global_size=16", "--memory-limit", "1GiB", "--repeats", "1"
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert "recommend: batch.micro_size=" in found.stdout


def test_the_api_holds_out_part_of_one_dataset_and_reports_mistakes_in_one_line(tmp_path, capsys):
    import largebatch
    from largebatch.data import ArrayDataset

    x = torch.randn(320, 8, generator=torch.Generator().manual_seed(0))
    common = [
        f"run.dir={tmp_path / 'run'}",
        "logging.progress=false",
        "train.steps=3",
        "batch.global_size=32",
    ]
    summary = largebatch.train(
        None,
        common,
        model=lambda: torch.nn.Linear(8, 2),
        train_data=ArrayDataset(x, (x[:, 0] > 0).long()),
    )
    assert summary["steps"] == 3 and set(summary["eval"]) == {"loss", "accuracy"}

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(SystemExit) as stopped:
        largebatch.train(None, common, model=lambda: torch.nn.Linear(8, 2), train_data=Stream())
    assert stopped.value.code == 2
    assert "it must be a map-style Dataset" in capsys.readouterr().err


def test_ranks_that_read_different_data_all_stop_at_start(tmp_path, run_dirs):
    """A node with another copy of the data would take other steps, or hang: every rank checks rank 0's."""
    (tmp_path / "ranked.py").write_text(
        textwrap.dedent("""
        import os
        import torch
        from largebatch.data import ArrayDataset

        def build_data():
            n = 256 + 32 * int(os.environ.get("RANK", 0))
            return ArrayDataset(torch.randn(n, 8), torch.randint(0, 2, (n,)))

        def build_model():
            return torch.nn.Linear(8, 2)
    """)
    )
    (tmp_path / "ranked.yaml").write_text(
        "data: {name: 'ranked:build_data'}\nmodel: {name: 'ranked:build_model'}\n"
        "batch: {global_size: 32}\n"
    )
    result = cli(
        "train",
        "--config",
        str(tmp_path / "ranked.yaml"),
        f"run.dir={run_dirs('run')}",
        "train.steps=2",
        nproc=2,
    )
    assert result.returncode == 1, result.stderr[
        -2000:
    ]  # torchrun's own report of the failed workers follows
    assert result.stderr.count("largebatch: stopped: some ranks read other data than rank 0") == 1


PLAN_RUN = (
    "data.size=512",
    "model.width=16",
    "batch.global_size=32",
    "train.steps=2",
    "train.checkpoint_every=2",
)


def test_plan_without_the_data_ignores_checkpoints_of_the_run(one_process):
    run = one_process / "plan"
    assert (run / "checkpoints" / "step_00000002").exists()
    result = cli_in_process(
        "plan",
        f"run.dir={run}",
        "data.size=512",
        "model.width=16",
        "batch.global_size=32",
        "--examples",
        "1024",
        "--world-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "steps_per_epoch  32" in result.stdout
