"""How every command starts and ends.

    from swin_common.cli import ArgumentParser, command

    @command()                        # or @command(exit_codes={"TrainingDiverged": 3}, ranked=True)
    def main(argv=None) -> int:
        args = ArgumentParser(prog="python -m pipeline.pull", ...).parse_args(argv)
        ...

- Expected failures end in ONE line on stderr, `error: ...`, naming the thing and what to do, and exit 2 (or
  the code the error's class or `exit_codes` gives, e.g. 3 for a diverged training). They are:
  - user errors, raised on purpose (swin_common.errors.UserError: a bad config key or value, a missing or
    unfinalized shard set, an unknown model or alias, an unreadable image, bad data; CommandError is the one a
    command raises with a ready message);
  - the world's refusals, whoever raised them: OSError (files, paths, permissions, connections), MLflow's
    MlflowException/RestException, boto3/botocore errors;
  - what a command names in `expected` (classes, or class names) or `exit_codes`.
- Anything else is a bug, a ValueError or RuntimeError of the project's own code too: its traceback is printed
  (redacted) and the exit status is 1.
- `--debug` (on every parser made with this module's ArgumentParser) or SWIN_DEBUG=1 prints the traceback of
  expected failures too.
- `ranked=True` (commands started once per rank by a launcher): the same error on several ranks shows once, an
  error of one rank shows once with its rank (`error: rank N: ...`). Once the process group runs, the ranks
  compare lines through its key-value store (hosted by rank 0, or torchrun's agent): each failing rank posts its
  line; rank 0 prints its own and waits (at most SWIN_RANK_GRACE_S, 10 s) until the others have posted theirs,
  so that its store outlives their question; another rank prints only a line rank 0 did not post. Before the
  process group (a bad config, on every rank alike), another rank waits the grace for the launcher to stop it
  once rank 0 has exited, and prints the line with its rank if it is still alive. Unexpected failures print on
  every rank.
- Everything the process writes through Python is redacted from the start (swin_common.redact).
- A command's `__main__` ends with `exit_process(main())`: the process leaves without the interpreter's
  finalization, which takes seconds once torch, timm, DeepSpeed and MLflow are loaded.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import logging
import os
import re
import sys
import threading
import time
import traceback

from .errors import USER_ERROR, UserError
from .redact import install_log_redaction, install_redaction, redact_text

BUG = 1
RANK_GRACE_S = 10.0  # the longest ranks wait for each other's error lines (SWIN_RANK_GRACE_S)
MAX_LINE = 600
_debug = False


class CommandError(UserError):
    """The user error a command raises itself, with a ready message and, when not 2, its own exit status."""

    def __init__(self, message: str, exit_code: int = USER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# -- arguments ---------------------------------------------------------------------------------------------
class _DebugAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        global _debug
        _debug = True


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """An argparse help formatter that shows an option's default where it tells the user something.

    argparse's "(default: X)" after an option's help, except where it says nothing (a default of None or
    False, a required option) or the help text already tells its default in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with `--debug` (on subcommands too) and usage errors in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action=_DebugAction, help="show the traceback of expected errors too (same as SWIN_DEBUG=1)"
        )

    def error(self, message: str):
        self.exit(USER_ERROR, f"error: {redact_text(message)} (see {self.prog} --help)\n")


def debug_enabled() -> bool:
    return _debug or os.environ.get("SWIN_DEBUG", "") not in ("", "0")


def configure_logging(**kwargs) -> None:
    """logging.basicConfig(force=True, **kwargs) with every handler's lines redacted."""
    logging.basicConfig(force=True, **kwargs)
    install_log_redaction()


def rank() -> str:
    """This process's rank in its job: RANK (launchers), else SLURM_PROCID (srun), else 0."""
    return (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0").strip()


def main_rank() -> bool:
    """Whether this process is rank 0 of its job (or not part of a distributed job)."""
    return rank() == "0"


# -- failures ----------------------------------------------------------------------------------------------
# the attribute error_context sets on an exception of any type (pipeline/evaluate.py sets it too)
_CONTEXT_ATTR = "_swin_context"


@contextlib.contextmanager
def error_context(what: str):
    """Names the thing an expected failure inside the block is about: `error: WHAT: message`."""
    try:
        yield
    except Exception as e:
        if getattr(e, _CONTEXT_ATTR, None) is None:
            setattr(e, _CONTEXT_ATTR, what)
        raise


def _classes(e: BaseException):
    return [(c.__module__ or "", c.__name__) for c in type(e).__mro__]


def _is_mlflow(e: BaseException) -> bool:
    return any(m.startswith("mlflow") and n == "MlflowException" for m, n in _classes(e))


def exit_code_of(e: BaseException, expected=(), exit_codes=None) -> int | None:
    """The exit status of an expected failure, or None for a bug."""
    names = {n for _, n in _classes(e)}
    for kind, code in (exit_codes or {}).items():
        if (isinstance(kind, str) and kind in names) or (isinstance(kind, type) and isinstance(e, kind)):
            return code
    if isinstance(e, UserError):
        return e.exit_code
    if any((isinstance(k, str) and k in names) or (isinstance(k, type) and isinstance(e, k)) for k in expected):
        return USER_ERROR
    if isinstance(e, OSError) or _is_mlflow(e):
        return USER_ERROR
    if any(m.split(".")[0] in ("botocore", "boto3", "s3transfer") for m, _ in _classes(e)):
        return USER_ERROR
    return None


_OS_HINTS = (
    (FileNotFoundError, "check the path"),
    (NotADirectoryError, "part of that path is a file, not a folder"),
    (IsADirectoryError, "that is a folder: give a file"),
    (FileExistsError, "it exists already"),
    (PermissionError, "check its permissions"),
)
_API_URL = re.compile(r"API request to (?P<server>\S+?)/(?:ajax-)?api/\S*")
_REASON = re.compile(
    r"\[Errno -?\d+\] (?P<errno>[^'\")\]]+)|(?P<other>Read timed out|timed out|Connection refused"
    r"|Name or service not known|Connection reset by peer|RemoteDisconnected)"
)


def describe(e: BaseException) -> str:
    """The one line an expected failure prints after `error: `, redacted."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    if _is_mlflow(e) or type(e).__module__.split(".")[0] in ("requests", "urllib3"):
        text = _describe_server_error(e, text)
    elif type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer"):
        text = f"S3: {text}"
    elif isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        hint = next((h for kind, h in _OS_HINTS if isinstance(e, kind)), None)
        text += f" ({hint})" if hint else ""
    context = getattr(e, _CONTEXT_ATTR, None)
    if context and not text.startswith(context):
        text = f"{context}: {text}"
    line = " ".join(text.split())
    if len(line) > MAX_LINE:
        line = line[: MAX_LINE - 3] + "..."
    return redact_text(line)


def _describe_server_error(e: BaseException, text: str) -> str:
    """MLflow's errors in words: a server that does not answer, a model or alias that does not exist."""
    reason = _REASON.search(text)
    api = _API_URL.search(text)
    if reason and (
        api or "Max retries exceeded" in text or "Failed to establish" in text or "timed out" in text.lower()
    ):
        where = api["server"] if api else (os.environ.get("MLFLOW_TRACKING_URI") or "the MLflow server")
        why = (reason["errno"] or reason["other"]).strip()
        return (
            f"cannot reach the MLflow server at {where} ({why}): start it, or set MLFLOW_TRACKING_URI to one that runs"
        )
    code = getattr(e, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST" or "RESOURCE_DOES_NOT_EXIST" in text:
        text = text.replace("RESOURCE_DOES_NOT_EXIST: ", "")
        server = os.environ.get("MLFLOW_TRACKING_URI")
        now = f"now {server}" if server else "unset: a local store"
        return (
            f"{text.rstrip('.')}: check the name, version or alias, and that MLFLOW_TRACKING_URI ({now}) "
            f"names the server that holds it"
        )
    return text


def report(e: BaseException, expected=(), exit_codes=None, ranked: bool = False) -> int:
    """Prints what a failure needs (one line, or a traceback) and returns the exit status."""
    code = exit_code_of(e, expected, exit_codes)
    if code is None or debug_enabled():
        text = "".join(traceback.format_exception(e))
        sys.stderr.write(redact_text(text))
        if code is not None:
            sys.stderr.write(f"error: {describe(e)}\n")
        sys.stderr.flush()
        return BUG if code is None else code
    line = describe(e)
    store = _job_store() if ranked else None
    if store is not None:
        _report_through_store(store, line)
    elif not ranked or main_rank():
        sys.stderr.write(f"error: {line}\n")
    else:
        # No process group yet: a launcher (deepspeed, torchrun, srun --kill-on-bad-exit) stops every rank once
        # one exits non-zero, so while rank 0 reports the same error, this rank is stopped silently here.
        # A rank still alive after the grace failed alone (rank 0 waits in a collective): it says so itself.
        time.sleep(_grace())
        sys.stderr.write(f"error: rank {rank()}: {line}\n")
    sys.stderr.flush()
    return code


def _grace() -> float:
    return float(os.environ.get("SWIN_RANK_GRACE_S", RANK_GRACE_S))


def _job_store():
    """The running process group's key-value store, or None (no group, or a world of one)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        # torch's own, with no public accessor: tests/test_cli_errors.py checks it in the pinned torch
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001  (then the grace below)
        return None


def _report_through_store(store, line: str) -> None:
    """The same line from several ranks once, rank 0's copy; another rank's own line with its rank."""
    from datetime import timedelta

    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    wait = timedelta(seconds=_grace())
    try:
        store.set(f"swin/error/{me}", line)
    except Exception:  # noqa: BLE001  (rank 0 and its store are gone: it has reported and exited)
        sys.stderr.write(f"error: {line}\n" if me == 0 else f"error: rank {me}: {line}\n")
        return
    if me == 0:
        sys.stderr.write(f"error: {line}\n")
        sys.stderr.flush()
        try:  # keep the store up until every other rank has posted (a rank that did not fail never does)
            store.wait([f"swin/error/{r}" for r in range(1, world)], wait)
        except Exception:  # noqa: BLE001
            pass
        return
    try:
        store.wait(["swin/error/0"], wait)
        same = store.get("swin/error/0").decode() == line
    except Exception:  # noqa: BLE001  (rank 0 did not fail, or is gone)
        same = False
    if not same:
        sys.stderr.write(f"error: rank {me}: {line}\n")


def command(expected=(), exit_codes=None, ranked: bool = False):
    """Makes `main` a command: output redacted, expected failures in one line, its exit status returned.

    Decorates a command's `main(argv=None) -> int`: redaction from the start, expected failures in one line
    (see the module's docstring). The decorated main returns the exit status (SystemExit passes through)."""

    def wrap(main_fn):
        @functools.wraps(main_fn)
        def run(argv=None) -> int:
            install_redaction()
            quiet_known_noise()
            try:
                return main_fn(argv)
            except (SystemExit, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001  (sorted into expected failures and bugs below)
                code = report(e, expected, exit_codes, ranked)
                if getattr(e, "hard_exit", False):  # the interpreter's own exit would hang or abort
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
                return code

        return run

    return wrap


# library warnings this project knows do not apply to it: each would repeat once per rank and command
KNOWN_NOISE = (
    # DeepSpeed's ZeRO calls it; nothing of this project does
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
)


def quiet_known_noise() -> None:
    """Silences the warnings and progress bars that tell the user nothing.

    Silences KNOWN_NOISE and MLflow's per-file artifact progress bars (this project says what it downloads:
    pipeline/tracking/registry.py); a user's own MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins."""
    import warnings

    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def exit_process(code: int):
    """Ends a command's process with `code`, after what Python's own exit does that matters.

    Ends a command's process with `code` (its `__main__`; never call it from a library function): what
    Python's own exit does that matters, then os._exit. The threads are shut down as the interpreter does it
    (threading's exit hooks, e.g. concurrent.futures', then the non-daemon threads are joined), the atexit
    handlers run (MLflow's, logging's, multiprocessing's, which ends DataLoader workers) and the standard
    streams are flushed. What is skipped is the finalization after that: the garbage collection of every
    loaded module and torch's operator deregistration (C++ static destructors), which take seconds per process
    with torch, timm, DeepSpeed and MLflow loaded (docs/performance.md), and a launch has several processes. A
    stop signal that lands in that teardown also no longer meets Python's reset, default handlers
    (pipeline.engine.stop).
    threading._shutdown and atexit._run_exitfuncs are CPython's own steps of its exit, with no public equivalent:
    tests/test_cli_errors.py checks them in the pinned CPython."""
    shutdown_threads = getattr(threading, "_shutdown", None)  # CPython's own step of the exit; absent: skipped
    if shutdown_threads is not None:
        shutdown_threads()
    # DALI's atexit handler is a full gc.collect(), there to free its pipelines before the interpreter's teardown,
    # which os._exit skips (its cost: docs/performance.md). Frozen, the heap is not walked again.
    gc.freeze()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code if isinstance(code, int) else 1)
