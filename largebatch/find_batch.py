"""`largebatch find-batch`: micro-batch size → peak memory, samples/s, fits or not; and the plan that keeps the global batch.

Sizes grow 1, 2, 4, then multiples of 8 doubling (8, 16, 32, ...) up to the per-rank share of the
global batch, and stop at the first that passes the memory budget or raises a real out-of-memory
error. Memory is measured as in `largebatch.memory`: the allocator's peak on CUDA; on CPU a count of
parameters + gradients + optimizer state + the activations autograd saves for backward (training), or
parameters and buffers + the largest module input + output (inference: nothing is saved for backward).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from largebatch import config, job, optim
from largebatch.task import forward, logits_of, take, to_device
from largebatch.errors import ArgumentParser
from largebatch.engine import engines
from largebatch.memory import ActivationMeter, parse_size, peak_bytes, state_bytes, training_state
from largebatch.precision import Precision


def sizes(limit: int) -> list[int]:
    out = [m for m in (1, 2, 4) if m <= limit]
    m = 8
    while m <= limit:
        out.append(m)
        m *= 2
    return out if out[-1] == limit else [*out, limit]


def _timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: allocations, thread pools
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


class _OutputMeter:
    """Peak of (input + output bytes) over leaf modules during a no-grad forward."""

    def __init__(self, model: nn.Module) -> None:
        self.peak = 0
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules() if not list(m.children())]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        self.peak = max(self.peak, sum(t.numel() * t.element_size() for t in tensors))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(prepared: job.Job, micro: int, inference: bool, repeats: int, device: torch.device) -> tuple[int, float]:
    """(peak bytes, samples/s) of one training step, or one forward pass, at micro-batch `micro`. Training: one
    process measures, and the state the configured engine does not keep on each rank of the plan's world (sharded
    parameters, gradients, optimizer state) is taken off the peak."""
    cfg, task = prepared.cfg, prepared.task
    torch.manual_seed(cfg.run.seed)
    model = task.build_model().to(device)
    optimizer = optim.build(model, cfg.optim, prepared.peak_lr)
    precision = Precision(cfg.train.precision, device)
    x, y = to_device(take(task.train, [i % len(task.train) for i in range(micro)]), device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if inference:
        model.eval()
        meter = _OutputMeter(model)

        def run() -> None:
            with torch.no_grad(), precision.autocast():
                forward(model, x)
        seconds = _timed(run, repeats)
        meter.close()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
            state_bytes(model, gradients=False) + meter.peak
    else:
        model.train()
        activations = ActivationMeter()

        def run() -> None:
            with activations.track(model), precision.autocast():
                total, count = task.loss(forward(model, x), y)
                loss = total / count
            precision.backward(loss)
            norm = precision.unscale_and_clip(optimizer, list(model.parameters()), None)
            precision.step(optimizer, loss.item(), norm.item())
            optimizer.zero_grad(set_to_none=True)
        seconds = _timed(run, repeats)
        whole = training_state(model, optimizer)
        mine = engines()[cfg.engine.name].per_rank(cfg, prepared.plan.world_size, whole)
        peak = peak_bytes(device, activations, model, optimizer) - whole.total + mine.total
    return peak, micro / seconds


def output_drift(prepared: job.Job, batch_sizes: list[int], device: torch.device, examples: int = 64) -> float:
    """Max |difference| of eval-mode outputs on the same examples computed at each batch size vs one at a time."""
    cfg, task = prepared.cfg, prepared.task
    torch.manual_seed(cfg.run.seed)
    model = task.build_model().to(device).eval()
    held = task.eval if task.eval is not None and len(task.eval) else task.train
    n = min(examples, len(held))

    def outputs(size: int) -> torch.Tensor:
        chunks = [to_device(take(held, range(i, min(i + size, n))), device)[0] for i in range(0, n, size)]
        return torch.cat([logits_of(forward(model, chunk)) for chunk in chunks])
    with torch.no_grad():
        reference = outputs(1)
        return max(float((outputs(b) - reference).abs().max()) for b in batch_sizes)


def _state_line(prepared: job.Job, device: torch.device) -> str:
    """Parameters, gradients and optimizer state per rank under the configured engine, against one process's."""
    cfg = prepared.cfg
    torch.manual_seed(cfg.run.seed)
    model = prepared.task.build_model().to(device)
    whole = training_state(model, optim.build(model, cfg.optim, prepared.peak_lr))
    mine = engines()[cfg.engine.name].per_rank(cfg, prepared.plan.world_size, whole)
    return (f"per rank parameters {_mib(mine.params)}, gradients {_mib(mine.grads)}, optimizer state "
            f"{_mib(mine.optimizer)} ({mine.total / whole.total:.2f}× one process's {_mib(whole.total)})")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="largebatch find-batch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--memory-limit", help="per-process budget, e.g. 8GiB (default: the GPU's memory; required on CPU to stop early)")
    parser.add_argument("--world-size", type=int, default=1, help="processes the job will run on (for the recommended plan)")
    parser.add_argument("--inference", action="store_true", help="forward passes in eval mode, and check outputs do not depend on the batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per size (after one warm-up)")
    args = parser.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    cfg.batch.micro_size = None if cfg.batch.micro_size == "auto" else cfg.batch.micro_size
    prepared = job.prepare(cfg, args.world_size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    budget = parse_size(args.memory_limit, "--memory-limit") if args.memory_limit else (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
    plan = prepared.plan
    how = "allocator peak" if device.type == "cuda" else (
        "parameters and buffers + largest module input/output (counted)" if args.inference
        else "parameters + gradients + optimizer state + saved activations (counted)")
    print(f"{'inference' if args.inference else 'training'}: {cfg.model.name} on {cfg.data.name}, {cfg.train.precision}, "
          f"{device.type}; memory = {how}; budget {_mib(budget) if budget else 'none'}")
    if not args.inference:
        print(f"engine.name={cfg.engine.name} on {plan.world_size} process(es): {_state_line(prepared, device)}")
    print(f"{'micro':>7} {'peak memory':>13} {'samples/s':>11}  status")
    fitting: list[int] = []
    for micro in sizes(plan.per_rank):
        try:
            peak, rate = measure(prepared, micro, args.inference, args.repeats, device)
            status = "ok" if budget is None or peak <= budget else "over budget"
        except torch.OutOfMemoryError:
            peak, rate, status = 0, 0.0, "out of memory"
        except ValueError as exc:  # e.g. BatchNorm on one example with a 1×1 feature map: try the next size
            print(f"{micro:>7} {'-':>13} {'-':>11}  cannot train ({str(exc).splitlines()[0]})")
            continue
        print(f"{micro:>7} {_mib(peak) if peak else '-':>13} {rate:>11.0f}  {status}")
        if status != "ok":
            break
        fitting.append(micro)
    if not fitting:
        print("nothing fits: lower the model size, use model.grad_checkpointing or train.precision=bf16")
        return 0
    if args.inference:
        print(f"max |output difference| across batch sizes {fitting} vs one example at a time: "
              f"{output_drift(prepared, fitting, device):.3g}")
        print(f"recommend: evaluate with batch size {fitting[-1]}")
        return 0
    best = max(m for m in fitting if plan.per_rank % m == 0)
    accum = plan.per_rank // best
    print(f"recommend: batch.micro_size={best} → global batch {plan.global_batch} = world {plan.world_size} × "
          f"micro {best} × accum {accum}")
    return 0
