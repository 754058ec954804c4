"""What the ``prh-fast`` command and its sub-CLIs (``prh_fast.cli_extract``,
``prh_fast.cli_store``) share: the one-line user errors, the exit codes and the argument types
and checks. ``prh_fast.cli`` builds the parser and registers the subcommands; it and the
sub-CLIs import these from here (and ``prh_fast.cli`` re-exports them).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from prh_fast.errors import InputError


class _UserError(InputError):
    """Bad input on the command line: reported in one line, exit code 2, no traceback."""


def _exit_code(err: BaseException):
    """The exit status of an error reported in one line, or None for a bug (traceback).

    User errors: the CLI's own checks, ``ValueError`` and its subclasses (the library's argument
    checks, ``StoreError``, ``DataNotFoundError``, ``ModelNotAvailableError``), ``OSError``
    (missing file, a folder where a file is expected, permissions, disk full) and an optional
    package that is not installed (an ``ImportError`` about a module outside prh_fast; one about
    prh_fast itself is a bug), and running out of memory (sizes too large for this machine). A
    failed distributed job (``DistributedError``) exits 1, as torchrun users are told in
    docs/distributed.md.
    """
    from prh_fast.distributed import DistributedError

    if isinstance(err, DistributedError):
        return 1
    if isinstance(err, (_UserError, ValueError, OSError, MemoryError)):
        return 2
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return 2
    if isinstance(err, ImportError):
        name = err.name or ""
        return None if name == "prh_fast" or name.startswith("prh_fast.") else 2
    return None


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        msg = f"{err.filename}: {err.strerror}"
    else:
        msg = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())


@contextlib.contextmanager
def _about(what: str):
    """Name ``what`` (e.g. the model being extracted) in the one line of a user error."""
    try:
        yield
    except Exception as err:
        if _exit_code(err) != 2 or isinstance(err, _UserError):
            raise
        raise _UserError(f"{what}: {_one_line(err)}") from err


def _run(args) -> int:
    prog = getattr(args, "_prog", "prh-fast")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        code = _exit_code(err)
        if code is None or _show_traceback():
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return code


def _show_traceback() -> bool:
    """The configured ``traceback`` setting (``PRH_FAST_TRACEBACK``, ``config_context``)."""
    from prh_fast import _config

    return bool(_config.get_config().traceback)


def _int_type(minimum: int, maximum=None):
    """An argparse ``type``: an integer in ``[minimum, maximum]``; argparse names the option
    in its one-line error."""
    hi = "" if maximum is None else f" and <= {maximum}"

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}{hi}, got {text!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}{hi}, got {v}")
        return v

    parse.__name__ = "integer"
    parse.bounds = (minimum, maximum)
    return parse


positive_int = _int_type(1)
nonnegative_int = _int_type(0)


def _quantile(text):
    """An argparse ``type``: a number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def check_output_folder(flag: str, path) -> None:
    """``path`` can be a folder to write into: not an existing file, nor below one."""
    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise _UserError(f"{flag} {path}: exists and is not a folder")
        here = path
    else:
        here = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(here):
            here = os.path.dirname(here)
        if not os.path.isdir(here):
            raise _UserError(f"{flag} {path}: {here} is a file, not a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise _UserError(f"{flag} {path}: {here} is not writable")


def check_device(flag: str, device, *, allow_auto: bool = False) -> None:
    """A torch device string that exists here, checked before any model is loaded;
    ``allow_auto``: "auto" too (language models spread over the GPUs)."""
    import torch

    if allow_auto and device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise _UserError(f"{flag} {device}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise _UserError(f"{flag} {device}: no CUDA GPU is usable here")
        if dev.index is not None and dev.index >= count:
            raise _UserError(f"{flag} {device}: only {count} CUDA GPU(s) here")
