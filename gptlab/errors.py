"""Errors that reach the user as one short line instead of a traceback, and how to find them.

Everything gptlab raises for a problem the user can fix is a GptlabError. The entry points report it
with `one_line`; a multirun records it in the failed job's directory (gptlab.run.job).
"""

from __future__ import annotations


class GptlabError(Exception):
    """A problem with the user's input (config, data, checkpoint, prompt) that they can fix."""


class ConfigError(GptlabError, ValueError):
    """A configuration value is invalid."""


class DataError(GptlabError):
    """The corpus or its prepared cache cannot be used."""


class CheckpointError(GptlabError):
    """A checkpoint is missing, unreadable, unsafe or does not fit."""


class NonFiniteLossError(GptlabError):
    """Training diverged: the loss became NaN or infinite."""


class LossSpikeError(GptlabError):
    """A loss spike stopped the run (callbacks.spikes.policy=stop, or too many spikes in a row)."""


def user_error(exc: BaseException | None) -> GptlabError | None:
    """The GptlabError behind `exc`, looking through the wrapping of Hydra's instantiate and Lightning's
    hooks; a Lightning MisconfigurationException counts as one too (it names a bad setting)."""
    if isinstance(exc, GptlabError):  # the common case, without importing Lightning
        return exc
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, GptlabError):
            return exc
        if isinstance(exc, MisconfigurationException):
            return ConfigError(str(exc).strip().splitlines()[0])
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def one_line(exc: BaseException) -> str:
    """A short account of any exception: the user error behind it, else its type and first line."""
    err = user_error(exc)
    if err is not None:
        return str(err)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def exit_on_user_error(fn):
    """Run a command-line program's body: a user error ends it as `Error: ...` on stderr and exit status
    1; any other exception (a bug) keeps its traceback, as every one does under HYDRA_FULL_ERROR=1."""
    import os
    import sys

    try:
        return fn()
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or user_error(e) is None:
            raise
        print(f"Error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
