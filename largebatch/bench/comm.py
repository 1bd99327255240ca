"""All-reduce time vs message size on `--nproc` gloo processes: the fitted α–β network model, and a check of it.

Each round times one `all_reduce` of every size (64 KiB … 32 MiB of float32), then the gradient all-reduce of a
second model — an MLP of other shapes, its gradients in the buckets DDP made for it (recorded by a communication
hook during real backward passes) — all-reduced one bucket after another as DDP's reducer does, without the overlap
with backward. Rounds alternate, so both see the same machine; medians over rounds count. The fit is least squares
on relative error of t = 2(p−1)·α + 2(p−1)/p · n/β (largebatch.network); the check compares the model's prediction
of the second model's gradient all-reduce, from its gradient bytes alone (as `largebatch plan --gpus` predicts it),
with the measured time, both as medians over rounds and round by round (each round's own fit against the same
round's check, median of the errors: measured side by side, a burst of load moves both). `--out FILE` writes the
fit for `largebatch plan --gpus … --network FILE`.
Run it with as many processes as free cores (2 here): more would measure oversubscription, not the network.
"""

import json
import math
import statistics
import sys
import time
from pathlib import Path

from largebatch import bench, network
from largebatch.errors import UserError

SIZES = [2**k for k in range(16, 26)]
"""Message sizes of the fit, in bytes: 64 KiB to 32 MiB."""
PER_MEASUREMENT = 16 * 2**20
"""Each measurement of a size repeats its all-reduce until this many bytes have gone, and counts the mean call, so
that a small message's time is not one scheduler hiccup."""
CHECK_MODEL = (1024, 3072, 1536, 10)
"""The second model: an MLP with these widths (7.9 M parameters, 31.6 MB of fp32 gradients in 3 DDP buckets)."""


def check_model():
    """The MLP whose gradient all-reduce the fit predicts."""
    from torch import nn

    layers = []
    for a, b in zip(CHECK_MODEL, CHECK_MODEL[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def ddp_buckets() -> list:
    """The gradient buckets of DDP on the check model, as its communication hook sees them on the third backward
    (DDP rebuilds its buckets after the first, in the order gradients became ready)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(check_model())
    seen: list[torch.Tensor] = []

    def hook(state: list, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.append(bucket.buffer().clone())
        return allreduce_hook(None, bucket)

    model.register_comm_hook(seen, hook)
    x = torch.randn(8, CHECK_MODEL[0])
    for _ in range(3):
        seen.clear()
        model(x).square().mean().backward()
    return seen


def worker(rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from largebatch import dist as ldist

    info = ldist.from_env()
    ldist.init(info, always=True)
    buckets = ddp_buckets()
    messages = [torch.ones(size // 4) for size in SIZES]

    def timed(tensors: list[torch.Tensor], calls: int = 1) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            for t in tensors:
                dist.all_reduce(t)
        return (time.perf_counter() - start) / calls

    for t in [*messages, *buckets]:  # warm-up: gloo's pairs and buffers
        timed([t])
    sweep: list[list[float]] = [[] for _ in SIZES]
    check: list[float] = []
    for _ in range(rounds):
        for times, message, size in zip(sweep, messages, SIZES):
            times.append(timed([message], calls=max(1, PER_MEASUREMENT // size)))
        check.append(timed(buckets))
    if info.rank == 0:
        print(
            json.dumps(
                {
                    "sweep": sweep,
                    "check": check,
                    "buckets": [b.numel() * b.element_size() for b in buckets],
                    "threads": torch.get_num_threads(),
                }
            )
        )
    ldist.teardown()


def round_errors(res: dict, grads: int, nproc: int) -> list[float]:
    """Relative error of each round's own fit predicting the same round's check: the two measured side by side,
    so a burst of load on the machine (which moves both) cancels more than it does between medians."""
    errors = []
    for r, measured in enumerate(res["check"]):
        try:
            latency, bandwidth = network.fit(SIZES, [times[r] for times in res["sweep"]], nproc)
        except UserError:  # a round whose times do not grow with size has no fit
            continue
        net = network.Network(latency, bandwidth, bandwidth, nproc)
        errors.append(net.gradient_all_reduce(grads, nproc) / measured - 1)
    return errors or [math.nan]


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser("comm", __doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds; medians count")
    parser.add_argument("--out", type=Path, help="write the fit here, for plan --gpus --network")
    args = parser.parse_args(argv)
    if args.nproc < 2:
        parser.error(f"--nproc={args.nproc}: an all-reduce needs 2 or more processes")
    res = bench.run_workers("largebatch.bench.comm", args.nproc, str(args.rounds))
    if res is None:
        return 1
    medians = [statistics.median(times) for times in res["sweep"]]
    latency, bandwidth = network.fit(SIZES, medians, args.nproc)
    net = network.Network(latency, bandwidth, bandwidth, args.nproc)
    print(f"all_reduce on {args.nproc} gloo processes, median of {args.rounds} rounds:")
    print(f"{'bytes':>10} {'measured ms':>12} {'fit ms':>8} {'spread ms':>14}")
    for size, times, median in zip(SIZES, res["sweep"], medians):
        spread = f"{min(times) * 1e3:.2f}–{max(times) * 1e3:.2f}"
        print(
            f"{size:>10} {median * 1e3:12.3f} {net.all_reduce(size, args.nproc) * 1e3:8.3f} {spread:>14}"
        )
    print(f"fit: latency α = {latency * 1e6:.1f} µs, bandwidth β = {bandwidth / 1e9:.3f} GB/s")
    grads = sum(res["buckets"])
    predicted = net.gradient_all_reduce(grads, args.nproc)
    measured = statistics.median(res["check"])
    paired = statistics.median(round_errors(res, grads, args.nproc))
    print(
        f"check: MLP {'-'.join(map(str, CHECK_MODEL))}, {grads} bytes of gradients in DDP's buckets "
        f"{res['buckets']}: measured {measured * 1e3:.2f} ms (spread {min(res['check']) * 1e3:.2f}–"
        f"{max(res['check']) * 1e3:.2f}), predicted {predicted * 1e3:.2f} ms ({predicted / measured - 1:+.1%}); "
        f"each round's fit against the same round's check, median {paired:+.1%} (goal within 25 %)"
    )
    if args.out:
        network.save(
            args.out,
            latency,
            bandwidth,
            processes=args.nproc,
            sizes=SIZES,
            median_s=medians,
            check={
                "bytes": grads,
                "buckets": res["buckets"],
                "measured_s": measured,
                "predicted_s": predicted,
                "round_error": paired,
            },
        )
        print(f"wrote {args.out}: largebatch plan --config FILE --gpus 8,64 --network {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        sys.exit(main())
