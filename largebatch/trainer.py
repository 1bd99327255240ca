"""The training loop: one optimizer step per global batch, accumulated over micro-steps."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch import config, models, optim
from largebatch.batch import GlobalBatchSampler
from largebatch.data import ArrayDataset, keep_batch
from largebatch.dist import DistInfo, all_reduce_sum
from largebatch.engine.ddp import DDPEngine
from largebatch.job import Job
from largebatch.optim.schedules import Schedule
from largebatch.precision import Precision
from largebatch.track import Tracker


def fit(job: Job, info: DistInfo) -> dict[str, Any]:
    """Train `job` on this rank (process group already joined); rank 0 writes the run directory. Returns the summary."""
    cfg, plan = job.cfg, job.plan
    torch.manual_seed(cfg.run.seed)
    torch.use_deterministic_algorithms(cfg.run.deterministic)
    run_dir = cfg.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, job.derived(), run_dir / "config.yaml")
        print(f"{plan.describe()}; peak lr {job.peak_lr:.6g}; {job.total_steps} steps "
              f"({job.steps_per_epoch} per epoch), warmup {job.warmup_steps}", flush=True)

    engine = DDPEngine(models.build(cfg.model, job.task.input_shape, job.task.num_classes), info)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    optimizer = optim.build(engine.module, cfg.optim, job.peak_lr)
    schedule = Schedule(cfg.schedule, job.total_steps, job.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    precision = Precision(cfg.train.precision, info.device)
    sampler = GlobalBatchSampler(len(job.task.train), plan, info.rank, cfg.run.seed, job.total_steps)
    loader = torch.utils.data.DataLoader(
        job.task.train, batch_sampler=sampler, collate_fn=keep_batch, num_workers=cfg.data.workers,
        pin_memory=info.device.type == "cuda",
    )
    tracker = Tracker(run_dir, info.is_main, cfg.logging.progress, job.total_steps)
    batches = iter(loader)
    loss_sum = torch.zeros((), device=info.device)
    start = last_log = time.perf_counter()
    last_logged_step, record, eval_s = 0, {}, 0.0

    for step in range(1, job.total_steps + 1):
        engine.model.train()
        for micro_step in range(plan.accum_steps):
            x, y = (t.to(info.device, non_blocking=True) for t in next(batches))
            engine.sync_gradients(micro_step == plan.accum_steps - 1)
            with precision.autocast():
                # Sum over the micro-batch / examples per rank per step; DDP's mean over ranks then
                # makes the gradient the mean over the global batch, whatever the split.
                loss = F.cross_entropy(engine.model(x), y, reduction="sum") / plan.per_rank
            precision.backward(loss)
            loss_sum += loss.detach()
        log_now = step % cfg.train.log_every == 0 or step == job.total_steps
        eval_now = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == job.total_steps
        grad_norm = precision.step(optimizer, params, cfg.train.clip_grad_norm, want_norm=log_now)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if log_now or eval_now:
            now = time.perf_counter()
            record = {
                "step": step,
                "samples": step * plan.global_batch,
                "epoch": step / job.steps_per_epoch,
                "loss": all_reduce_sum(loss_sum).item() / info.world_size,
                "lr": lr,
                "grad_norm": grad_norm.item() if grad_norm is not None else None,
                "samples_per_s": (step - last_logged_step) * plan.global_batch / (now - last_log),
            }
            if eval_now:
                record.update({f"eval/{k}": v for k, v in evaluate(engine.module, job.task.eval, info).items()})
                eval_s += time.perf_counter() - now
            tracker.log(record)
            last_log, last_logged_step = time.perf_counter(), step
        loss_sum.zero_()

    wall_s = time.perf_counter() - start
    summary = {
        "steps": job.total_steps,
        "samples": job.total_steps * plan.global_batch,
        "final_loss": record["loss"],
        "eval": {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")},
        "wall_s": wall_s,
        "samples_per_s": job.total_steps * plan.global_batch / (wall_s - eval_s),
        "world_size": plan.world_size,
        "global_batch": plan.global_batch,
        "micro_batch": plan.micro_batch,
        "accum_steps": plan.accum_steps,
        "peak_lr": job.peak_lr,
        "params_sha256": params_sha256(engine.module),
    }
    tracker.close()
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save(engine.module.state_dict(), run_dir / "model.pt")
    return summary


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ArrayDataset, info: DistInfo, batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy on the held-out set, sharded over ranks (rank r takes every world_size-th example)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=info.device)
    mine = torch.arange(info.rank, len(dataset), info.world_size)
    for chunk in mine.split(batch_size):
        x, y = (t.to(info.device) for t in dataset.__getitems__(chunk.tolist()))
        logits = model(x)
        totals += torch.stack([
            F.cross_entropy(logits.float(), y, reduction="sum").double(),
            (logits.argmax(1) == y).sum().double(),
            torch.tensor(len(y), dtype=torch.float64, device=info.device),
        ])
    loss, correct, count = all_reduce_sum(totals).tolist()
    return {"loss": loss / count, "accuracy": correct / count}


def params_sha256(model: nn.Module) -> str:
    """Hash of every tensor in the state dict, by name, so two runs can be checked for bit-identity."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
