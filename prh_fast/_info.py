"""``prh_fast.info()`` / ``prh-fast info``: what was built and what is usable here."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any, TextIO


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """Describe the build and the runtime (the one place that queries CUDA).

    Returns:
        A dict: versions (``prh_fast``, ``python``, ``torch``, ``numpy``, ``triton``,
        ``faiss``), ``native`` (whether ``prh_fast._C`` loaded) and its ``build`` record,
        ``cuda_kernels``, ``torch_threads``, ``threads`` (what prh_fast computes with),
        ``omp_wait_policy`` (how idle OpenMP threads wait, and who decided), ``cpu_screen``
        (the product dtype of the CPU search's candidates for float32 features, the setting
        and why), ``gpus`` and ``torch_cuda``.

    Example:
        >>> from prh_fast._info import collect
        >>> d = collect()
        >>> isinstance(d["native"], bool), isinstance(d["gpus"], list)
        (True, True)
    """
    import torch

    from prh_fast import _native
    from prh_fast._version import __version__

    out = {
        "prh_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "native": _native.HAS_NATIVE,
    }
    if _native.HAS_NATIVE:
        out["build"] = dict(_native.native().build_info())
    else:
        out["native_error"] = str(_native.NATIVE_ERROR)
    out["cuda_kernels"] = _native.HAS_CUDA_KERNELS
    out["triton"] = _version("triton") if importlib.util.find_spec("triton") else None
    out["faiss"] = _version("faiss-cpu") or _version("faiss-gpu") or (
        "installed" if importlib.util.find_spec("faiss") else None)
    out["torch_threads"] = torch.get_num_threads()
    from prh_fast._threads import effective_threads, wait_policy

    out["threads"] = effective_threads()
    policy, why = wait_policy()
    out["omp_wait_policy"] = {"policy": policy, "why": why}
    from prh_fast._config import get_config
    from prh_fast.knn._cpu import cpu_screen

    setting = get_config().cpu_screen
    screen, why = cpu_screen(torch.float32, setting)
    out["cpu_screen"] = {"setting": setting, "float32": str(screen).replace("torch.", ""),
                         "why": why}
    gpus = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    except Exception as exc:  # a broken driver must not break `info`
        gpus.append(f"error: {exc}")
    out["gpus"] = gpus
    out["torch_cuda"] = torch.version.cuda
    return out


def info(file: TextIO | None = None) -> dict[str, Any]:
    """Print what prh_fast was built with and what it can use here.

    Args:
        file: Where to print (default: ``sys.stdout``).

    Returns:
        The dict of :func:`collect`.

    Example:
        >>> import io
        >>> import prh_fast
        >>> out = io.StringIO()
        >>> d = prh_fast.info(file=out)
        >>> d["prh_fast"] == prh_fast.__version__, out.getvalue().startswith("prh_fast ")
        (True, True)
    """
    import sys

    d = collect()
    f = file or sys.stdout
    b = d.get("build", {})
    lines = [
        f"prh_fast {d['prh_fast']}  (python {d['python']}, torch {d['torch']}, numpy {d['numpy']})",
        "  native CPU kernels : "
        + ("yes" if d["native"] else "NO (" + d.get("native_error", "") + ")"),
    ]
    if b:
        lines += [
            f"  OpenMP             : {'yes' if b.get('openmp') else 'no'}"
            f" ({b.get('omp_max_threads')} threads)",
            f"  compiler           : {b.get('compiler')}  [{b.get('build_type')}]",
            "  CUDA kernels       : "
            + (f"yes (CUDA {b.get('cuda_version')}, archs {b.get('cuda_archs')})"
               if b.get("cuda") else "not built"),
        ]
    wp = d["omp_wait_policy"]
    lines += [
        f"  threads            : {d['threads']} (torch and the native kernels together; "
        f"PRH_FAST_NUM_THREADS sets it)",
        f"  idle OpenMP threads: {wp['policy']} ({wp['why']})",
    ]
    cs = d["cpu_screen"]
    lines += [
        f"  cpu screen         : {cs['float32']} ({cs['why']}; exact lists either way)",
        f"  Triton             : {d['triton'] or 'not installed'}",
        f"  FAISS              : {d['faiss'] or 'not installed'}",
        f"  torch CUDA         : {d['torch_cuda'] or 'CPU-only build'}",
        f"  visible GPUs       : {', '.join(d['gpus']) if d['gpus'] else 'none'}",
    ]
    print("\n".join(lines), file=f)
    return d
