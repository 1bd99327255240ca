"""Trainer overhead: samples/s of `trainer.fit` vs a minimal hand-written loop, same model, data and batch.

Both run in the same torchrun job, alternating in ABBA order, so they see the same machine state; the ratio of
medians is printed with the median and spread of the per-repeat ratios (goal ≥ 0.99), then both medians as times per
step and their difference, a cost per step that a longer step pays in a smaller proportion. Throughput counts the
training loop only, not the final eval. `--engine ddp` (the default) and `--engine fsdp` compare the trainer on that
engine with a hand-written DDP or FSDP2 loop on an MLP with SGD; `--gpt` compares the trainer on the built-in GPT with a
loop doing what nanoGPT's train.py step does (no_sync micro-steps, clipping at 1, fused AdamW, compile off; goal ≥
1.0). `--gpt --device cuda` does that on a GPU, on GPT-2 small's body in bf16 against nanoGPT's GPU step (both sides
with pinned, non-blocking batch copies and bf16 autocast), with tokens/s and MFU for both sides; `--compile`
compiles the model on both sides. `--engine deepspeed` alternates the trainer on engine ddp, DeepSpeed ZeRO-0 and
ZeRO-2 instead, and prints each ZeRO stage's ratio to DDP. The hand-written loops are pinned by hash
(tests/test_bench_loop.py): speed the trainer, not slow the baseline.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

from largebatch import bench

CONFIG = (
    "data.name=synthetic",
    "data.size=32768",
    "data.shape=[256]",
    "model.name=mlp",
    "model.width=1024",
    "model.depth=2",
    "batch.global_size=512",
    "batch.micro_size=128",
    "optim.name=sgd",
    "optim.lr=0.1",
    "logging.progress=false",
    "train.log_every=10",
)
GPT_CONFIG = (
    "data.name=text",
    "data.context=64",
    "model.name=gpt",
    "model.width=128",
    "model.depth=4",
    "model.heads=4",
    "batch.global_size=64",
    "batch.micro_size=16",
    "optim.name=adamw",
    "optim.lr=1e-3",
    "optim.reference_batch=64",
    "optim.scaling=none",
    "optim.weight_decay=0.1",
    "optim.betas=[0.9,0.99]",
    "train.clip_grad_norm=1.0",
    "logging.progress=false",
    "train.log_every=10",
)
"""gpt-char's model and batch (configs/gpt-char.yaml) at micro-batch 16, clipped as nanoGPT's train.py."""
GPT_GPU_CONFIG = (
    "data.name=text",
    "data.context=1024",
    "model.name=gpt",
    "model.width=768",
    "model.depth=12",
    "model.heads=12",
    "batch.global_size=32",
    "batch.micro_size=16",
    "optim.name=adamw",
    "optim.lr=6e-4",
    "optim.reference_batch=32",
    "optim.scaling=none",
    "optim.weight_decay=0.1",
    "optim.betas=[0.9,0.95]",
    "train.clip_grad_norm=1.0",
    "train.precision=bf16",
    "logging.progress=false",
    "train.log_every=10",
)
"""`--gpt --device cuda`: GPT-2 small's body (12 × 12 heads × 768, 1024 positions; the byte-level text, so a
256-token vocabulary) in bf16 with nanoGPT's GPT-2 hyperparameters, 32 sequences a step in micro-batches of 16."""
DEEPSPEED = ("engine.name=deepspeed",)
FSDP = ("engine.name=fsdp",)
MAX_NORM = 1.0
"""`--clip`: both sides clip the gradient norm at this (the trainer's train.clip_grad_norm, the hand-written loop's
torch clip_grad_norm_)."""
CLIP = (f"train.clip_grad_norm={MAX_NORM}",)
LOOPS = {
    "ddp": {"hand-written": ("hand-written DDP loop", None), "trainer": ("largebatch trainer", ())},
    "fsdp": {
        "hand-written": ("hand-written FSDP2 loop", None),
        "trainer": ("largebatch trainer, fsdp", FSDP),
    },
    "gpt": {"nanoGPT-style": ("nanoGPT-style loop", None), "trainer": ("largebatch trainer", ())},
    "gpt-gpu": {
        "nanoGPT-style": ("nanoGPT-style loop, GPU", None),
        "trainer": ("largebatch trainer, GPU", ()),
    },
    "ddp-clip": {
        "hand-written": ("hand-written DDP loop + clip", None),
        "trainer": ("largebatch trainer, clip", CLIP),
    },
    "fsdp-clip": {
        "hand-written": ("hand-written FSDP2 loop + clip", None),
        "trainer": ("largebatch trainer, fsdp, clip", (*FSDP, *CLIP)),
    },
    "deepspeed": {
        "DDP": ("trainer, engine ddp", ()),
        "ZeRO-0": ("trainer, ZeRO-0", (*DEEPSPEED, "engine.zero_stage=0")),
        "ZeRO-2": ("trainer, ZeRO-2", (*DEEPSPEED, "engine.zero_stage=2")),
    },
}
"""--engine (gpt for --gpt, gpt-gpu for --gpt --device cuda, ENGINE-clip for --clip) → the loops compared,
baseline first: name → (label, overrides of its job's config; None: the hand-written loop, clipping in an ENGINE-clip
loop)."""
GOALS = {
    "ddp": 0.99,
    "fsdp": 0.99,
    "gpt": 1.0,
    "gpt-gpu": 1.0,
    "ddp-clip": 0.99,
    "fsdp-clip": 0.99,
}


def handwritten(job, info) -> float:
    """nanoGPT-style: index the tensors, skip the all-reduce on all but the last micro-step, step. Returns samples/s."""
    import torch
    import torch.nn.functional as F

    from largebatch.dist import all_reduce_sum

    torch.manual_seed(job.cfg.run.seed)
    model = job.task.build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=job.peak_lr, momentum=0.9, foreach=True)
    x_all, y_all = job.task.train.inputs, job.task.train.labels
    plan, n = job.plan, len(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for step in range(job.total_steps):
        first = (step * plan.global_batch + info.rank * plan.per_rank) % (n - plan.global_batch)
        for m in range(plan.accum_steps):
            idx = order[first + m * plan.micro_batch : first + (m + 1) * plan.micro_batch]
            if info.world_size > 1:
                ddp.require_backward_grad_sync = m == plan.accum_steps - 1
            loss = F.cross_entropy(ddp(x_all[idx]), y_all[idx]) / plan.accum_steps
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % job.cfg.train.log_every == 0:
            all_reduce_sum(loss.detach().clone()).item()
    return job.total_steps * plan.global_batch / (time.perf_counter() - start)


def handwritten_fsdp(job, info) -> float:
    """torch's FSDP2 recipe: fully_shard the model, reduce-scatter on the last micro-step only, step. Samples/s."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    from largebatch.dist import all_reduce_sum

    torch.manual_seed(job.cfg.run.seed)
    model = fully_shard(job.task.build_model())
    opt = torch.optim.SGD(model.parameters(), lr=job.peak_lr, momentum=0.9, foreach=True)
    x_all, y_all = job.task.train.inputs, job.task.train.labels
    plan, n = job.plan, len(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for step in range(job.total_steps):
        first = (step * plan.global_batch + info.rank * plan.per_rank) % (n - plan.global_batch)
        for m in range(plan.accum_steps):
            idx = order[first + m * plan.micro_batch : first + (m + 1) * plan.micro_batch]
            model.set_requires_gradient_sync(m == plan.accum_steps - 1)
            model.set_reshard_after_backward(m == plan.accum_steps - 1)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx]) / plan.accum_steps
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % job.cfg.train.log_every == 0:
            all_reduce_sum(loss.detach().clone()).item()
    return job.total_steps * plan.global_batch / (time.perf_counter() - start)


def handwritten_gpt(job, info) -> float:
    """nanoGPT's train.py step: no_sync on all but the last micro-step, the next batch fetched after forward, clip
    at 1, fused AdamW with decay on 2-D weights, the LR set every step, rank 0's loss read on log steps. Samples/s."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(job.cfg.run.seed)
    model = job.task.build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=job.peak_lr, betas=(0.9, 0.99), fused=True)
    x_all, y_all = job.task.train.inputs, job.task.train.labels
    plan, n = job.plan, len(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    def get_batch(step, m):
        first = (step * plan.global_batch + info.rank * plan.per_rank) % (n - plan.global_batch)
        idx = order[first + m * plan.micro_batch : first + (m + 1) * plan.micro_batch]
        return x_all[idx], y_all[idx]

    x, y = get_batch(0, 0)
    start = time.perf_counter()
    for step in range(job.total_steps):
        for group in opt.param_groups:
            group["lr"] = job.peak_lr
        for m in range(plan.accum_steps):
            if info.world_size > 1:
                ddp.require_backward_grad_sync = m == plan.accum_steps - 1
            logits = ddp(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)) / plan.accum_steps
            last = m == plan.accum_steps - 1
            x, y = get_batch(step + last, 0 if last else m + 1)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % job.cfg.train.log_every == 0 and info.rank == 0:
            loss.item()
    return job.total_steps * plan.global_batch / (time.perf_counter() - start)


def handwritten_gpt_gpu(job, info) -> float:
    """nanoGPT's train.py step on a GPU: the model on the device (torch.compile'd when train.compile), batches indexed
    on the CPU and copied pinned and non-blocking, the next fetched after forward, autocast in train.precision's
    dtype with a GradScaler for fp16, no_sync on all but the last micro-step, unscale then clip, fused AdamW with
    decay on 2-D weights, the LR set every step, rank 0's loss read on log steps. Samples/s, the device synchronised
    before the clock stops."""
    import torch
    import torch.nn.functional as F

    device, cfg = info.device, job.cfg
    torch.manual_seed(cfg.run.seed)
    model = job.task.build_model().to(device)
    if cfg.train.compile:
        model = torch.compile(model)
    ddp = model
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=job.peak_lr, betas=tuple(cfg.optim.betas), fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x_all, y_all = job.task.train.inputs, job.task.train.labels
    plan, n = job.plan, len(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    def get_batch(step, m):
        first = (step * plan.global_batch + info.rank * plan.per_rank) % (n - plan.global_batch)
        idx = order[first + m * plan.micro_batch : first + (m + 1) * plan.micro_batch]
        x, y = x_all[idx], y_all[idx]
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
                device, non_blocking=True
            )
        return x.to(device), y.to(device)

    x, y = get_batch(0, 0)
    start = time.perf_counter()
    for step in range(job.total_steps):
        for group in opt.param_groups:
            group["lr"] = job.peak_lr
        for m in range(plan.accum_steps):
            if info.world_size > 1:
                ddp.require_backward_grad_sync = m == plan.accum_steps - 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = ddp(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
                loss = loss / plan.accum_steps
            last = m == plan.accum_steps - 1
            x, y = get_batch(step + last, 0 if last else m + 1)
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.train.log_every == 0 and info.rank == 0:
            loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return job.total_steps * plan.global_batch / (time.perf_counter() - start)


BASELINES = {
    "ddp": handwritten,
    "fsdp": handwritten_fsdp,
    "gpt": handwritten_gpt,
    "gpt-gpu": handwritten_gpt_gpu,
    "ddp-clip": handwritten,
    "fsdp-clip": handwritten_fsdp,
}
"""LOOPS' key → its hand-written loop; their sources are pinned by hash in tests/test_bench_loop.py."""


@contextlib.contextmanager
def clipping(max_norm: float) -> Iterator[None]:
    """torch.optim.SGD clips its gradients' global norm with torch's clip_grad_norm_ before each step: the pinned
    SGD loops as a user who clips would write them (under FSDP2 the norm of sharded gradients is an all-reduce)."""
    import torch

    step = torch.optim.SGD.step

    def clipped(self, *args, **kwargs):
        torch.nn.utils.clip_grad_norm_(
            [p for g in self.param_groups for p in g["params"]], max_norm
        )
        return step(self, *args, **kwargs)

    torch.optim.SGD.step = clipped
    try:
        yield
    finally:
        torch.optim.SGD.step = step


def measure(job, info, hand_written: bool, loop: str = "ddp") -> float:
    """Samples/s of one run of `loop`'s hand-written loop (clipping in an ENGINE-clip loop) or of `trainer.fit`, on a
    fresh copy of the job's built model (FSDP2 shards a module once; each run starts from the same weights)."""
    import torch

    from largebatch import trainer

    gc.collect()  # the last run's model and optimizer state (held by reference cycles) go now, not in a timed run
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    if hand_written:
        with clipping(MAX_NORM) if loop.endswith("-clip") else contextlib.nullcontext():
            return BASELINES[loop](job, info)
    fresh = dataclasses.replace(job, model=copy.deepcopy(job.model))
    return trainer.fit(fresh, info)["samples_per_s"]


def worker(engine: str, steps: int, repeats: int, compile_model: bool = False) -> None:
    """Runs under torchrun: alternate the loops of `engine` `repeats` times (both sides compiling the model with
    `compile_model`); rank 0 prints one JSON line, with the FLOPs behind tokens/s and MFU on a GPT."""
    from largebatch import config, dist, flops, job

    info = dist.from_env()
    dist.init(info, always=engine.removesuffix("-clip") in ("deepspeed", "fsdp"))
    base = {"gpt": GPT_CONFIG, "gpt-gpu": GPT_GPU_CONFIG}.get(engine, CONFIG)
    base = (*base, *(("train.compile=true",) if compile_model else ()))
    loops = LOOPS[engine]
    samples_per_s: dict[str, list[float]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {
            name: job.prepare(
                config.load(
                    None,
                    [*base, *(overrides or ()), f"train.steps={steps}", f"run.dir={tmp}/{name}"],
                ),
                info.world_size,
            )
            for name, (_, overrides) in loops.items()
        }
        first = next(iter(loops))
        gpt = jobs[first].cfg.model.name == "gpt"
        if gpt:  # collective: every rank measures the peak
            cfg, model = jobs[first].cfg, jobs[first].task.build_model()
            rate = flops.measure(
                model,
                jobs[first].task,
                jobs[first].plan.micro_batch,
                cfg.train.precision,
                info,
            )
        for name, (_, overrides) in loops.items():  # warm-up: allocator, thread pools, gloo buffers
            measure(jobs[name], info, overrides is None, engine)
        order = list(loops.items())
        for repeat in range(repeats):  # ABBA: neither side always runs first, after the other's run
            for name, (_, overrides) in order if repeat % 2 == 0 else order[::-1]:
                samples_per_s[name].append(measure(jobs[name], info, overrides is None, engine))
    dist.teardown()
    if info.is_main:
        plan = jobs[first].plan
        result = {
            "samples_per_s": samples_per_s,
            "plan": plan.describe(),
            "global_batch": plan.global_batch,
        }
        if gpt:
            result["tokens"] = {
                "model": describe_gpt(cfg, model),
                "per_example": cfg.data.context,
                "flops_per_token": rate.flops_per_token,
                "peak": rate.peak,
                "described": rate.described,
                "device": str(info.device),
            }
        print(json.dumps(result))


def spread(ratios: list[float]) -> str:
    """The median, quartiles and range of per-repeat ratios."""
    q1, median, q3 = (
        statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    )
    return f"per repeat: median {median:.3f}, quartiles {q1:.3f}–{q3:.3f}, range {min(ratios):.3f}–{max(ratios):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser("loop", __doc__)
    parser.add_argument(
        "--nproc", type=int, help="processes (default 2; --device cuda: one per GPU)"
    )
    parser.add_argument(
        "--steps", type=int, help="optimizer steps per measurement (default 40; --gpt: 10)"
    )
    parser.add_argument(
        "--repeats", type=int, default=9, help="alternating measurements of each loop"
    )
    parser.add_argument(
        "--engine",
        choices=["ddp", "fsdp", "deepspeed"],
        default="ddp",
        help="ddp, fsdp: the trainer on it against a hand-written loop; deepspeed: ZeRO-0 and ZeRO-2 against DDP",
    )
    parser.add_argument(
        "--gpt",
        action="store_true",
        help="the trainer on the built-in GPT against a nanoGPT-style loop (DDP)",
    )
    parser.add_argument(
        "--clip",
        action="store_true",
        help=f"ddp, fsdp: both sides clip the gradient norm at {MAX_NORM}, the hand-written loop with torch's "
        "clip_grad_norm_ (under FSDP2 an all-reduce a step, as any loop that clips or logs the norm pays)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda (with --gpt): GPT-2 small's body in bf16 on the GPUs against nanoGPT's GPU step",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="--device cuda: both sides torch.compile the model (train.compile=true; torch.compile in the loop)",
    )
    args = parser.parse_args(argv)
    if args.clip and (args.gpt or args.engine == "deepspeed"):
        parser.error("--clip is for --engine ddp or fsdp (the --gpt loops clip already)")
    if args.device == "cuda" and not args.gpt:
        parser.error(
            "--device cuda is for --gpt (the MLP and DeepSpeed comparisons are CPU baselines)"
        )
    if args.compile and args.device != "cuda":
        parser.error(
            "--compile is for --gpt --device cuda (the CPU loops are pinned eager baselines)"
        )
    if args.device == "cuda":
        gpus = bench.cuda_devices()
        args.nproc = args.nproc or gpus
        if args.nproc > gpus:
            parser.error(
                f"--nproc {args.nproc} with --device cuda needs a GPU each; this machine has {gpus}"
            )
    loop = (
        ("gpt-gpu" if args.device == "cuda" else "gpt")
        if args.gpt
        else f"{args.engine}-clip"
        if args.clip
        else args.engine
    )
    args.nproc = args.nproc or 2
    args.steps = args.steps or (10 if args.gpt else 40)
    res = bench.run_workers(
        "largebatch.bench.loop",
        args.nproc,
        loop,
        str(args.steps),
        str(args.repeats),
        *(["compile"] if args.compile else []),
        cpu_only=args.device == "cpu",
    )
    if res is None:
        return 1
    loops = LOOPS[loop]
    runs = res["samples_per_s"]
    median = {name: statistics.median(values) for name, values in runs.items()}
    compiled = ", compiled" if args.compile else ""
    print(
        f"{res['plan']}, {args.nproc} process{'es' if args.nproc > 1 else ''}{compiled}, {args.steps} steps × "
        f"{args.repeats} repeats (median)"
    )
    width = max(26, *(len(label) for label, _ in loops.values()))
    tokens = res.get("tokens")
    for name, (label, _) in loops.items():
        print(
            f"{label:{width}} {median[name]:10.0f} samples/s{tokens_and_mfu(median[name], tokens)}"
        )
    if tokens:
        print(f"on {tokens['device']}, {tokens['model']}: {tokens['described']}")
    base, *others = loops
    goal = f" (goal ≥ {GOALS[loop]})" if loop in GOALS else ""
    for name in others:
        ratios = [mine / theirs for mine, theirs in zip(runs[name], runs[base])]
        print(f"ratio {name} / {base} = {median[name] / median[base]:.3f}{goal}; {spread(ratios)}")
        print(step_time_line(name, base, median, res["global_batch"]))
    return 0


def step_time_line(name: str, base: str, median: dict[str, float], global_batch: int) -> str:
    """The two median throughputs as times per optimizer step, and their difference: a cost per step, which a model
    whose step takes longer pays in a smaller proportion."""
    ms = {side: 1e3 * global_batch / median[side] for side in (base, name)}
    return (
        f"step time: {base} {ms[base]:.2f} ms, {name} {ms[name]:.2f} ms "
        f"({ms[name] - ms[base]:+.2f} ms a step)"
    )


def describe_gpt(cfg, model) -> str:
    """The benchmark GPT's shape, its vocabulary included (MFU counts the output head: a small vocabulary lowers it)."""
    return (
        f"GPT {cfg.model.depth} × {cfg.model.width}, {cfg.model.heads} heads, {cfg.data.context} positions, "
        f"vocabulary {model.token.num_embeddings}"
    )


def tokens_and_mfu(samples_per_s: float, tokens: dict | None) -> str:
    """', N tokens/s, MFU x %' for a GPT loop (every target of the text is a valid token), else ''."""
    if not tokens:
        return ""
    per_s = samples_per_s * tokens["per_example"]
    mfu = (
        f", MFU {per_s * tokens['flops_per_token'] / tokens['peak']:.1%}"
        if tokens["peak"] and tokens["flops_per_token"]
        else ""
    )
    return f", {per_s:.0f} tokens/s{mfu}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:6] == ["compile"])
    else:
        sys.exit(main())
