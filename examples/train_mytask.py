"""The Python route: the same task as examples/mytask.yaml, passed as objects to `largebatch.train`.

python examples/train_mytask.py [section.key=value ...]
torchrun --nproc-per-node 2 examples/train_mytask.py
"""

import sys

from mytask import build_data, build_model, loss

import largebatch

if __name__ == "__main__":
    train_set, eval_set = build_data(size=4096)
    config = {
        "run": {"name": "mytask-api"},
        "batch": {"global_size": 256},
        "optim": {"name": "adamw", "lr": 3e-3, "reference_batch": 256},
        "schedule": {"name": "cosine", "warmup_steps": 10},
        "train": {"epochs": 8, "eval_every": 16},
        "model": {"args": {"hidden": 64}},
    }
    summary = largebatch.train(
        config, sys.argv[1:], model=build_model, train_data=train_set, eval_data=eval_set, loss=loss
    )
    print(f"final loss {summary['final_loss']:.4f}, held-out {summary['eval']}")
