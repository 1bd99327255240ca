"""Several optimizers stepped as one `torch.optim.Optimizer`, for the trainer, the engines and checkpoints.

Its `param_groups` are the children's group dicts (the same objects, child by child), so whoever sets a group's
"lr" (optim/hyper.py) sets it for the child that steps it; its `state` is the children's `state` (one mapping, by
parameter), so `state_dict`, `named_state_dict` and torch.distributed.checkpoint's `get_state_dict`/
`set_state_dict` see every parameter's state in one place, numbered group by group as for any optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Composite(torch.optim.Optimizer):
    """`children` stepped in order; `labels[i]` says which parameters child i holds and why (the start line)."""

    def __init__(self, children: list[torch.optim.Optimizer], labels: list[str]) -> None:
        self.children = children
        self.labels = labels
        super().__init__([group for child in children for group in child.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point every child at this optimizer's group dicts and state (after construction and after a load, which
        replaces both)."""
        start = 0
        for child in self.children:
            end = start + len(child.param_groups)
            child.param_groups = self.param_groups[start:end]
            child.state = self.state
            start = end

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for child in self.children:
            child.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    def split(self) -> list[dict[str, Any]]:
        """Per child: its label, how many tensors and parameters it steps."""
        return [
            {
                "group": label,
                "tensors": sum(len(g["params"]) for g in child.param_groups),
                "params": sum(p.numel() for g in child.param_groups for p in g["params"]),
            }
            for child, label in zip(self.children, self.labels)
        ]
