"""``prh-fast`` under ``torchrun``: join the process group, run the command on every rank.

``prh-fast align`` calls :func:`run_align_command`; outside torchrun (``WORLD_SIZE`` unset or 1)
it simply runs the command. Under torchrun every rank joins the default process group (gloo, or
nccl when the rank has a GPU), runs the same command (which uses
``prh_fast.distributed.align_models``), and only rank 0 prints and draws heatmaps. A failed
collective (a rank died or stalled) ends the rank with one clear line on stderr and exit code 1,
after which torchrun stops the job and names the failed rank too.
"""
from __future__ import annotations

import contextlib
import io
import sys

from prh_fast.distributed._env import DistributedError, init_from_env, launched_by_torchrun

__all__ = ["run_align_command"]


def run_align_command(run, args) -> int:
    """Run a ``prh-fast`` command on this rank; distributed when launched with several ranks.

    Args:
        run: The command's function, ``run(args) -> exit code``.
        args: The parsed command line (``heatmap`` and ``no_progress`` are switched off on
            ranks other than 0).

    Returns:
        The exit code: ``run``'s, or 1 after a failed collective (with one line on stderr).

    Example:
        >>> import argparse
        >>> from prh_fast.distributed.launch import run_align_command
        >>> run_align_command(lambda args: 0, argparse.Namespace())  # outside torchrun
        0
    """
    if not launched_by_torchrun():
        return run(args)
    import torch.distributed as dist

    created = init_from_env()
    try:
        rank = dist.get_rank()
        if rank != 0:
            # One report per job: other ranks compute and stay quiet.
            args.heatmap = False
            args.no_progress = True
            with contextlib.redirect_stdout(io.StringIO()):
                rc = run(args)
        else:
            rc = run(args)
        return rc
    except DistributedError as err:
        print(f"prh-fast align: error: {err}", file=sys.stderr)
        return 1
    finally:
        if created:
            # Also after a failure: a group left to the interpreter's exit can abort the
            # process (gloo's threads), which would hide the exit code and the message.
            dist.destroy_process_group()
