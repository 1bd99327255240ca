"""The one exception type for mistakes a user can make and fix."""

import argparse
import difflib
import importlib
import os
import signal
import sys
from typing import Any, NoReturn


class UserError(Exception):
    """Bad config, CLI value, file or batch plan; the CLI prints it as one line and exits 2."""


class TrainingStopped(Exception):
    """The run stopped itself for a stated reason (e.g. a non-finite gradient with train.nonfinite=stop); every rank
    raises it at the same step. The CLI prints it as one line and exits `exit_code`."""

    exit_code = 1


class Preempted(TrainingStopped):
    """Every rank stopped at a step boundary on a signal and saved a checkpoint; the process exits 128 + signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} after step {step}; checkpoint saved, "
            f"rerun the same command (run.resume=auto) to continue"
        )
        self.exit_code = 128 + signum


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or fail in one line saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # also a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise UserError(
            f"{what} needs {module} ({exc}); pip install 'largebatch[{extra}]'"
        ) from None


def warn(message: str) -> None:
    """One warning line on stderr, from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"largebatch: warning: {message}", file=sys.stderr, flush=True)


def check_choice(key: str, value: str, options: list[str] | tuple[str, ...]) -> str:
    """Return `value` if it is one of `options`, else raise a UserError suggesting the closest."""
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"{key}={value!r} is not one of {', '.join(options)}{hint}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors, so they too end as one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see '{self.prog} --help')")
