"""Shared benchmark harness: timing, environment record, table, atomic JSON.

Every ``bench_<op>.py`` (run from the repository root as ``python -m benchmarks.bench_<op>``)
checks correctness first, then times (p20/p50/p80 over repeats; CUDA events on GPU), prints a
table and writes JSON with shapes, dtypes, device, versions and the git revision. Numbers in the
README come from these files.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

#: The repository root: child processes of the benchmarks put it on ``sys.path`` (or run from
#: it) to import ``benchmarks.*``.
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def git_revision() -> str:
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                      cwd=Path(__file__).parent, stderr=subprocess.DEVNULL)
        dirty = subprocess.call(["git", "diff", "--quiet"], cwd=Path(__file__).parent,
                                stderr=subprocess.DEVNULL)
        return rev.decode().strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment() -> dict:
    import numpy

    import prh_fast
    from prh_fast._info import collect

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "prh_fast": prh_fast.__version__,
        "git": git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    info = collect()
    env["build"] = info.get("build")
    env["faiss"] = info.get("faiss")
    env["gpus"] = info.get("gpus")
    return env


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, *, repeats: int = 5, warmup: int = 1, device=None, max_seconds: float = 60.0):
    """Run ``fn`` and return ``(last_result, {"p20","p50","p80","runs"})`` in seconds.

    Stops repeating once ``max_seconds`` of measured time have been spent (at least one run).
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    spent = 0.0
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > max_seconds:
            break
    times.sort()

    def q(p):
        if len(times) == 1:
            return times[0]
        return statistics.quantiles(times, n=100, method="inclusive")[p - 1]

    return result, {"p20": q(20), "p50": q(50), "p80": q(80), "runs": len(times)}


def interleaved(fns: dict, repeats: int) -> dict:
    """Time several callables side by side: one untimed warm-up call each, then ``repeats``
    rounds calling each once. Returns ``{name: {"value", "seconds" (median), "times"}}`` or
    ``{name: {"error": repr}}`` for a callable that raised (it leaves the rounds)."""
    out, live = {}, {}
    for name, fn in fns.items():
        try:
            out[name] = {"value": fn(), "times": []}
            live[name] = fn
        except Exception as exc:  # a failing competitor is reported, not fatal
            out[name] = {"error": repr(exc)}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            t0 = time.perf_counter()
            try:
                value = fn()
            except Exception as exc:
                out[name] = {"error": repr(exc)}
                live.pop(name)
                continue
            out[name]["times"].append(time.perf_counter() - t0)
            out[name]["value"] = value
    for name in live:
        out[name]["seconds"] = statistics.median(out[name]["times"])
    return out


def loadavg() -> list | None:
    """The 1-, 5- and 15-minute load averages (None where the OS does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format). Returns and prints the table."""
    heads = [h for _, h, _ in columns]
    cells = [[("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(heads)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(heads, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` atomically to ``<out_dir>/<name>.json`` (temp file + rename)."""
    from prh_fast._io import atomic_write

    path = Path(out_dir or RESULTS) / f"{name}.json"
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``VmHWM``).

    Not ``getrusage().ru_maxrss``: on Linux that keeps the high-water mark of the process image
    before ``exec``, so a child spawned from a large parent reports the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def finish(name: str, benchmark: str, args, rows: list, columns: list, *, footer: str = "") -> Path:
    """Print the table (and an optional footer line), write ``<name>.json`` with the
    environment, the arguments and the rows, and say where it went."""
    table = print_table(rows, columns)
    if footer:
        print(footer)
    path = write_json(name, {"benchmark": benchmark, "env": environment(), "args": vars(args),
                             "rows": rows, "table": table}, getattr(args, "out", None))
    print(f"wrote {path}")
    return path
