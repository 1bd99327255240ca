"""`pkg.module:callable` factories for models, datasets and losses: resolved, checked and called in one place.

A user's module is imported from the config file's directory and the working directory (then sys.path).
Every way this can go wrong before training — no such module, no such attribute, not callable, an argument
the callable does not take — is a one-line UserError.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from largebatch.errors import UserError


def resolve(key: str, spec: str, origin: str | None = None) -> Callable[..., Any]:
    """The callable `spec` = 'pkg.module:name' names, for config key `key`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(
            f"{key}={spec!r} must look like pkg.module:callable, e.g. mymodels:build_model"
        )
    for directory in dict.fromkeys(d for d in (os.getcwd(), origin) if d):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except (
        Exception
    ) as exc:  # a user module's own import error is theirs to fix: name it in one line
        raise UserError(
            f"{key}={spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
            f"put it beside the config file or in the working directory, or install it"
        ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            public = [
                n
                for n, v in vars(module).items()
                if not n.startswith("_")
                and callable(v)
                and getattr(v, "__module__", None) == module.__name__
            ]
            raise UserError(
                f"{key}={spec!r}: {module_name} has no {attr!r} (it has {', '.join(public) or 'nothing callable'})"
            )
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{key}={spec!r}: {attr} is a {type(target).__name__}, not a callable")
    return target


def check_args(key: str, fn: Callable[..., Any], args: dict[str, Any], name: str) -> None:
    """Fail in one line if `fn` cannot be called with keyword arguments `args` (named `key` in the config)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: the call itself will tell
    params = signature.parameters
    named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = ", ".join(named) or "no keyword arguments"
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in args if k not in named]
        if unknown:
            raise UserError(
                f"{key} has {', '.join(unknown)}, which {name} does not take (it takes {takes})"
            )
    try:
        signature.bind(**args)
    except TypeError as exc:
        raise UserError(
            f"{key}={args} does not fit {name} ({exc}; it takes {takes}); set them in {key}"
        ) from None


def call(key: str, fn: Callable[..., Any], args: dict[str, Any], name: str) -> Any:
    """`fn(**args)` after `check_args`."""
    check_args(key, fn, args, name)
    return fn(**args)
