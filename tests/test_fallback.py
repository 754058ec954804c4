"""prh_fast without the native module: one warning, same numbers from torch kernels."""
import json
import subprocess
import sys
import textwrap

import pytest

_C = pytest.importorskip("prh_fast._C")

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["prh_fast._C"] = None  # make `import prh_fast._C` fail as if it was never built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import prh_fast
        import torch
        from prh_fast import metrics  # the first module that needs the native one loads it
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    A = torch.tanh(z @ torch.randn(6, 20, generator=g, dtype=torch.float64))
    B = torch.sin(z @ torch.randn(6, 30, generator=g, dtype=torch.float64))
    out = {m: metrics.measure(m, A, B, **({"topk": 7} if "knn" in m or m == "cknna" else {}))
           for m in metrics.SUPPORTED_METRICS}
    print(json.dumps({"native": prh_fast._native.HAS_NATIVE,
                      "warnings": [str(w.message) for w in caught
                                   if "native module" in str(w.message)],
                      "scores": out}))
    """
)


@pytest.mark.slow
def test_import_without_native_warns_once_and_matches():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["native"] is False
    assert len(data["warnings"]) == 1
    import torch

    from prh_fast import metrics

    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    A = torch.tanh(z @ torch.randn(6, 20, generator=g, dtype=torch.float64))
    B = torch.sin(z @ torch.randn(6, 30, generator=g, dtype=torch.float64))
    for m, v in data["scores"].items():
        native = metrics.measure(m, A, B, **({"topk": 7} if "knn" in m or m == "cknna" else {}))
        assert v == pytest.approx(native, rel=1e-10, abs=1e-12), m
