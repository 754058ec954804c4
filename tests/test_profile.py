"""Profiling against a reference checkout, with a stand-in module of the reference's shape."""
from pathlib import Path

import pytest

from prh_fast.profile import load_reference, paired_features, profile_against

FAKE = Path(__file__).parent / "fixtures" / "fake_reference"


def test_profile_against_stand_in_matches():
    X, Y = paired_features(96, 3, 24, seed=1)
    rep = profile_against(FAKE, x_feats=X.double(), y_feats=Y.double(), topk=5,
                          grid_metrics=["mutual_knn", "cka"])
    assert [r["metric"] for r in rep.rows][:2] == ["cycle_knn", "mutual_knn"]
    for r in rep.rows:
        assert "error" not in r, r
        assert r["abs_diff"] < 1e-6, r  # two reference metrics return float32 tensors
        assert r["reference_s"] > 0 and r["prh_fast_s"] > 0
    assert len(rep.grid) == 2
    for g in rep.grid:
        assert "error" not in g, g
        assert g["same_pair"], g
        assert g["prh_fast_best"][0] == pytest.approx(g["reference_best"][0], rel=1e-9)
    text = rep.table()
    assert "mutual_knn" in text and "same pair" in text


def test_missing_checkout_and_missing_metrics(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_reference(tmp_path / "nope")
    with pytest.raises(ValueError, match="metrics.py"):
        load_reference(tmp_path)


def test_grid_skipped_without_measure_alignment(tmp_path):
    (tmp_path / "metrics.py").write_text((FAKE / "metrics.py").read_text())
    rep = profile_against(tmp_path, n=64, d=8, layers=2, topk=3, metrics=["mutual_knn"])
    assert rep.rows[0]["abs_diff"] < 1e-6
    assert rep.grid == [] and "measure_alignment.py not found" in rep.notes[0]


def test_broken_reference_import_is_reported(tmp_path):
    (tmp_path / "metrics.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ValueError, match="importing"):
        load_reference(tmp_path)


@pytest.mark.slow
def test_cli_bench_against_stand_in(tmp_path):
    import subprocess
    import sys

    from prh_fast.store import save_features

    X, Y = paired_features(80, 2, 12, seed=3)
    save_features(tmp_path / "x.pt", X, num_params=1)
    save_features(tmp_path / "y.pt", Y, num_params=1)
    out = subprocess.run([sys.executable, "-m", "prh_fast.cli", "bench", "--against", str(FAKE),
                          "--x", str(tmp_path / "x.pt"), "--y", str(tmp_path / "y.pt"),
                          "--topk", "5", "--metrics", "mutual_knn", "cka"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "mutual_knn" in out.stdout and "same pair" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "prh_fast.cli", "bench", "--against",
                          str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a folder" in bad.stderr


def test_repeats_warmup_load_and_svcca_note(monkeypatch):
    """Each measurement runs once untimed, then ``repeats`` times (median reported)."""
    import prh_fast.profile as P

    calls = []
    real = P.fast_metrics.measure

    def counting(m, *a, **k):
        calls.append(m)
        return real(m, *a, **k)

    monkeypatch.setattr(P.fast_metrics, "measure", counting)
    X, Y = paired_features(64, 2, 12, seed=2)
    rep = profile_against(FAKE, x_feats=X.double(), y_feats=Y.double(), topk=4,
                          metrics=["mutual_knn", "svcca"], grid_metrics=["cka"], repeats=4)
    assert calls == ["mutual_knn"] * 5 + ["svcca"] * 5  # 1 warm-up + 4 timed each
    assert rep.repeats == 4 and len(rep.load) == 2
    assert any("randomised SVD" in n for n in rep.notes)
    text = rep.table()
    assert "medians of 4 runs after a warm-up" in text and "machine load" in text
    with pytest.raises(ValueError, match="repeats"):
        profile_against(FAKE, repeats=0)


def test_missing_reference_dependency_names_the_package(tmp_path):
    (tmp_path / "metrics.py").write_text("import sklearn_is_not_here.sub\n")
    with pytest.raises(ValueError, match="pip install sklearn_is_not_here"):
        load_reference(tmp_path)
    (tmp_path / "metrics.py").write_text("import sklearn\n")
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        with pytest.raises(ValueError, match="pip install scikit-learn"):
            load_reference(tmp_path)


def test_torchaudio_stands_in_for_edit_distance_only_when_missing(tmp_path):
    import importlib.util
    import sys

    if importlib.util.find_spec("torchaudio") is not None:
        pytest.skip("torchaudio is installed: no stand-in is used")
    (tmp_path / "metrics.py").write_text(
        "import torchaudio.functional as TAF\n"
        "from prh_fast import reference\n"
        "class AlignmentMetrics:\n"
        "    @staticmethod\n"
        "    def measure(name, A, B, **kw):\n"
        "        if name == 'edit_distance_knn':\n"
        "            a = reference.knn(A, kw['topk'])\n"
        "            b = reference.knn(B, kw['topk'])\n"
        "            d = [TAF.edit_distance(x, y) for x, y in zip(a, b)]\n"
        "            return 1 - sum(d) / len(d) / kw['topk']\n"
        "        return reference.measure(name, A, B, **kw)\n")
    ref = load_reference(tmp_path)
    assert len(ref.stubs) == 1 and "torchaudio" in ref.stubs[0]
    assert "torchaudio" not in sys.modules  # the stand-in does not outlive the import
    report = profile_against(tmp_path, n=80, d=12, layers=2, topk=4,
                             metrics=["edit_distance_knn", "mutual_knn"], repeats=1)
    assert [r["abs_diff"] < 1e-12 for r in report.rows] == [True, True]
    assert any("edit_distance_knn ran with a stand-in" in n
               for n in report.notes)
    # metrics that do not use it carry no such note
    other = profile_against(tmp_path, n=80, d=12, layers=2, topk=4, metrics=["mutual_knn"],
                            repeats=1)
    assert not any("stand-in" in n for n in other.notes), other.notes
