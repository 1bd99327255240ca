"""`pkg.module:callable` factories for models, datasets and losses: resolved, checked and called in one place.

A user's module is imported from the config file's directory and the working directory (then sys.path).
Every way this can go wrong before training — no such module, no such attribute, not callable, an argument
the callable does not take — is a one-line UserError.

A callable may ask for values the caller knows (the data's vocab_size, ...) by naming a parameter after them; one
that takes a single config dataclass (`GPT(config: GPTConfig)`, or an unannotated `GPT(config)` beside a
`GPTConfig` dataclass, as in nanoGPT) gets that dataclass built from the arguments and known values instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable, Mapping
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


def call(
    key: str,
    fn: Callable[..., Any],
    args: dict[str, Any],
    name: str,
    known: Mapping[str, Any] | None = None,
) -> Any:
    """`fn(**args)` after `check_args`, with the `known` values `fn` names as parameters and `args` leaves out; or,
    for a callable of one config dataclass, `fn(Config(**args and known fields))`."""
    known = known or {}
    config_class = config_class_of(fn)
    if config_class is not None and not set(args) & set(_named(fn)):
        fields = [f.name for f in dataclasses.fields(config_class) if f.init]
        values = {k: v for k, v in known.items() if k in fields and k not in args} | args
        check_args(key, config_class, values, f"{config_class.__name__} (the config of {name})")
        return fn(config_class(**values))
    takes = _named(fn)
    values = {k: v for k, v in known.items() if k in takes and k not in args} | args
    check_args(key, fn, values, name)
    return fn(**values)


def config_class_of(fn: Callable[..., Any]) -> type | None:
    """The dataclass `fn`'s one parameter is: its annotation, or, unannotated, the dataclass named
    `<fn>Config` in fn's module (nanoGPT's GPT and GPTConfig); None for any other callable."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if len(params) != 1 or params[0].kind not in (
        params[0].POSITIONAL_ONLY,
        params[0].POSITIONAL_OR_KEYWORD,
    ):
        return None
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # an annotation that does not resolve: not a config class we can build
        hints = {}
    found = hints.get(params[0].name)
    if found is None and params[0].annotation is inspect.Parameter.empty:
        module = sys.modules.get(getattr(fn, "__module__", ""), None)
        found = getattr(module, f"{getattr(fn, '__name__', '')}Config", None)
    return found if inspect.isclass(found) and dataclasses.is_dataclass(found) else None


def _named(fn: Callable[..., Any]) -> list[str]:
    """The parameters `fn` takes by keyword."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
