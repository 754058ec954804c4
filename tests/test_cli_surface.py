"""The whole ``prh-fast`` command line: every subcommand, taken from the argparse parser itself,
succeeds where that is cheap and turns user errors into one line and a non-zero exit.

A user error (bad number, missing or corrupt file, a folder where a file is expected and the
reverse, mismatched samples, wrong shapes) exits 2 (``store verify``: 1, its "check failed"
status) with one line naming the offending argument or file, and never a traceback; a bug
(any other exception) keeps its traceback. A subcommand added to the parser fails
``test_every_subcommand_has_cases`` until it gets cases here. Runs in-process through
``prh_fast.cli.main``, plus a few real subprocesses; no real model is loaded.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from prh_fast import cli
from prh_fast.cli import commands, main

N = 40
FAKE_REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "fake_reference")


def _feats(seed, n=N, layers=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, layers, d, generator=g)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Small inputs of every kind, good and bad, by name."""
    from prh_fast.store import pt_to_store

    root = tmp_path_factory.mktemp("cli_surface")
    p = {"root": str(root)}

    def put(name, obj):
        p[name] = str(root / f"{name}.pt")
        torch.save(obj, p[name])

    put("a", {"feats": _feats(0)})
    put("b", {"feats": _feats(1)})
    put("short", {"feats": _feats(2, n=N - 10)})
    put("oned", {"feats": torch.randn(N)})
    put("nofeats", {"x": _feats(3)})
    put("bare", _feats(4))
    for name, data in (("corrupt", b"not a torch file"), ("empty", b"")):
        p[name] = str(root / f"{name}.pt")
        (root / f"{name}.pt").write_bytes(data)
    p["dir_pt"] = str(root / "dir.pt")  # a folder named like a feature file
    os.mkdir(p["dir_pt"])
    p["afile"] = str(root / "afile")  # a plain file where folders are expected
    (root / "afile").write_text("x")
    p["emptydir"] = str(root / "emptydir")
    os.mkdir(p["emptydir"])
    p["missing"] = str(root / "missing.pt")
    p["store"] = str(root / "store")
    pt_to_store(p["a"], p["store"], progress=False)
    p["badstore"] = str(root / "badstore")  # an index field of the wrong type
    shutil.copytree(p["store"], p["badstore"])
    idx = root / "badstore" / "prh_store.json"
    d = json.loads(idx.read_text())
    d["n"] = "forty"
    idx.write_text(json.dumps(d))
    p["junkstore"] = str(root / "junkstore")  # an index that is not JSON
    shutil.copytree(p["store"], p["junkstore"])
    (root / "junkstore" / "prh_store.json").write_text("{not json")
    p["truncstore"] = str(root / "truncstore")  # a shard cut short
    shutil.copytree(p["store"], p["truncstore"])
    shard = next(f for f in os.listdir(p["truncstore"]) if f.endswith(".safetensors"))
    with open(os.path.join(p["truncstore"], shard), "r+b") as f:
        f.truncate(100)
    # paired data: captions.jsonl + images
    from PIL import Image

    data = root / "pairs"
    data.mkdir()
    with open(data / "captions.jsonl", "w") as f:
        for i, c in enumerate(["a red circle", "a blue square", "green", "a small shape"]):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": c}) + "\n")
    p["pairs"] = str(data)
    return p


@pytest.fixture(autouse=True)
def _keep_logging():
    """extract/demo switch prh_fast's INFO lines on for the process; undo it after a test."""
    log = logging.getLogger("prh_fast")
    handlers, level = list(log.handlers), log.level
    yield
    log.handlers[:] = handlers
    log.setLevel(level)


def run(argv, capsys):
    """``prh-fast argv`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------- cases
# (command, id, argv after the command with {name} for paths[name], exit status, what the
# error line must name; for successes: what stdout must contain). "{tmp}" is a fresh folder.

OK, USER = 0, 2
CASES = [
    # info
    (("info",), "text", [], OK, ["prh_fast"]),
    (("info",), "json", ["--json"], OK, ['"prh_fast"']),
    (("info",), "unknown-option", ["--bogus"], USER, ["--bogus"]),
    (("info",), "stray-argument", ["extra"], USER, ["extra"]),
    # example
    (("example",), "small", ["--n", "40", "--topk", "5"], OK, ["mutual_knn", "cknna"]),
    (("example",), "n-zero", ["--n", "0"], USER, ["--n"]),
    (("example",), "n-below-topk", ["--n", "3"], USER, ["--n 3", "--topk"]),
    (("example",), "n-too-small-for-svcca", ["--n", "10", "--topk", "5"], USER,
     ["--n 10", "svcca"]),
    (("example",), "topk-zero", ["--topk", "0"], USER, ["--topk"]),
    (("example",), "topk-one-cknna", ["--topk", "1"], USER, ["--topk 1", "cknna"]),
    (("example",), "n-not-a-number", ["--n", "many"], USER, ["--n", "many"]),
    (("example",), "seed-negative", ["--seed", "-1"], USER, ["--seed"]),
    # align
    (("align",), "files", ["--x", "{a}", "--y", "{b}", "--output_dir", "{tmp}", "--topk", "5"],
     OK, ["wrote:"]),
    (("align",), "store-folder", ["--x", "{store}", "--y", "{b}", "--output_dir", "{tmp}",
                                  "--metric", "cka"], OK, ["wrote:"]),
    (("align",), "output-dir-is-a-file", ["--x", "{a}", "--y", "{b}", "--output_dir",
                                          "{afile}"], USER, ["--output_dir", "{afile}"]),
    (("align",), "output-dir-below-a-file", ["--x", "{a}", "--y", "{b}", "--output_dir",
                                             "{afile}/sub"], USER, ["--output_dir", "{afile}"]),
    (("align",), "missing-file", ["--x", "{a}", "--y", "{missing}"], USER, ["{missing}"]),
    (("align",), "folder-as-file", ["--x", "{a}", "--y", "{dir_pt}"], USER,
     ["{dir_pt}", "not a feature store"]),
    (("align",), "corrupt-file", ["--x", "{a}", "--y", "{corrupt}", "--output_dir", "{tmp}"],
     USER, ["{corrupt}"]),
    (("align",), "empty-file", ["--x", "{a}", "--y", "{empty}", "--output_dir", "{tmp}"], USER,
     ["{empty}"]),
    (("align",), "no-feats-key", ["--x", "{a}", "--y", "{nofeats}", "--output_dir", "{tmp}"],
     USER, ["{nofeats}", "feats"]),
    (("align",), "bare-tensor", ["--x", "{a}", "--y", "{bare}", "--output_dir", "{tmp}"], USER,
     ["{bare}"]),
    (("align",), "wrong-shape", ["--x", "{a}", "--y", "{oned}", "--output_dir", "{tmp}"], USER,
     ["{oned}", "shape"]),
    (("align",), "sample-mismatch", ["--x", "{a}", "--y", "{short}", "--output_dir", "{tmp}"],
     USER, ["{short}", "N = 30"]),
    (("align",), "input-dir-missing", ["--input_dir", "{root}/nowhere"], USER,
     ["--input_dir", "nowhere"]),
    (("align",), "input-dir-is-a-file", ["--input_dir", "{afile}"], USER,
     ["--input_dir", "not a folder"]),
    (("align",), "backend-spec-bad-option", ["--x", "{a}", "--y", "{b}", "--backend",
                                             "faiss-ivf:zz=1"], USER, ["'zz'"]),
    (("align",), "input-dir-empty", ["--input_dir", "{emptydir}"], USER, ["{emptydir}"]),
    (("align",), "q-zero", ["--x", "{a}", "--y", "{b}", "--q", "0"], USER, ["--q"]),
    (("align",), "q-above-one", ["--x", "{a}", "--y", "{b}", "--q", "1.5"], USER, ["--q"]),
    (("align",), "topk-zero", ["--x", "{a}", "--y", "{b}", "--topk", "0"], USER, ["--topk"]),
    (("align",), "topk-above-samples", ["--x", "{a}", "--y", "{b}", "--topk", "100",
                                        "--output_dir", "{tmp}"], USER, ["topk", "100"]),
    (("align",), "null-permutations-negative", ["--x", "{a}", "--y", "{b}",
                                                "--null-permutations", "-1"], USER,
     ["--null-permutations"]),
    (("align",), "stream-budget-zero", ["--x", "{a}", "--y", "{b}", "--stream-budget", "0"],
     USER, ["--stream-budget"]),
    (("align",), "unknown-metric", ["--x", "{a}", "--y", "{b}", "--metric", "nope"], USER,
     ["--metric"]),
    (("align",), "unknown-backend", ["--x", "{a}", "--y", "{b}", "--backend", "nope",
                                     "--output_dir", "{tmp}"], USER, ["--backend nope"]),
    (("align",), "knn-option-exact-backend", ["--x", "{a}", "--y", "{b}", "--knn-option",
                                              "nlist=4"], USER, ["--knn-option"]),
    (("align",), "bad-store-index", ["--x", "{badstore}", "--y", "{b}", "--output_dir",
                                     "{tmp}"], USER, ["badstore", "'n'"]),
    # bench
    (("bench",), "generated", ["--against", FAKE_REFERENCE, "--n", "40", "--d", "8",
                               "--layers", "2", "--topk", "3", "--metrics", "cka"], OK,
     ["cka"]),
    (("bench",), "files", ["--against", FAKE_REFERENCE, "--x", "{a}", "--y", "{b}", "--topk",
                           "3", "--metrics", "mutual_knn"], OK, ["mutual_knn"]),
    (("bench",), "against-missing", ["--against", "{root}/no-reference"], USER,
     ["--against", "no-reference"]),
    (("bench",), "against-is-a-file", ["--against", "{afile}"], USER, ["--against", "{afile}"]),
    (("bench",), "x-without-y", ["--against", FAKE_REFERENCE, "--x", "{a}"], USER,
     ["--x", "--y"]),
    (("bench",), "x-missing", ["--against", FAKE_REFERENCE, "--x", "{missing}", "--y", "{b}"],
     USER, ["{missing}"]),
    (("bench",), "y-corrupt", ["--against", FAKE_REFERENCE, "--x", "{a}", "--y", "{corrupt}"],
     USER, ["{corrupt}"]),
    (("bench",), "sample-mismatch", ["--against", FAKE_REFERENCE, "--x", "{a}", "--y",
                                     "{short}"], USER, ["{a}", "{short}"]),
    (("bench",), "n-zero", ["--against", FAKE_REFERENCE, "--n", "0"], USER, ["--n"]),
    (("bench",), "topk-above-n", ["--against", FAKE_REFERENCE, "--n", "5", "--topk", "10"],
     USER, ["--n 5", "--topk"]),
    # extract (no real model: argument errors, offline availability, a tiny local model)
    (("extract",), "paper-set-offline", ["--models", "paper-val-lang", "--output_dir", "{tmp}"],
     USER, ["paper-val-lang", "not available"]),
    (("extract",), "unknown-set", ["--models", "no-such-set"], USER, ["--models", "no-such-set"]),
    (("extract",), "set-kind-conflict", ["--models", "paper-val-vision", "--modality",
                                         "language"], USER, ["--modality", "paper-val-vision"]),
    (("extract",), "unknown-modality", ["--model", "m", "--modality", "audio"], USER,
     ["--modality", "audio"]),
    (("extract",), "no-model", [], USER, ["--model"]),
    (("extract",), "n-zero", ["--model", "m", "--n", "0"], USER, ["--n"]),
    (("extract",), "batch-size-zero", ["--model", "m", "--batch-size", "0"], USER,
     ["--batch-size"]),
    (("extract",), "text-pool-for-vision", ["--model", "m", "--modality", "vision", "--pool",
                                            "last"], USER, ["--pool", "last"]),
    (("extract",), "unknown-pool", ["--model", "m", "--pool", "cls"], USER, ["--pool", "cls"]),
    (("extract",), "caption-level-vision", ["--model", "m", "--modality", "vision",
                                            "--caption-level", "full"], USER,
     ["--caption-level"]),
    (("extract",), "bad-device", ["--model", "m", "--device", "toaster"], USER,
     ["--device", "toaster"]),
    (("extract",), "bad-dtype", ["--model", "m", "--dtype", "int3"], USER, ["--dtype"]),
    (("extract",), "output-dir-is-a-file", ["--model", "m", "--output_dir", "{afile}"], USER,
     ["--output_dir", "{afile}"]),
    (("extract",), "data-missing", ["--model", "m", "--data", "{root}/no-data", "--output_dir",
                                    "{tmp}"], USER, ["no-data"]),
    (("extract",), "data-is-a-feature-file", ["--model", "m", "--data", "{a}", "--output_dir",
                                              "{tmp}"], USER, ["{a}"]),
    (("extract",), "n-above-data", ["--model", "m", "--data", "{pairs}", "--n", "99",
                                    "--output_dir", "{tmp}"], USER, ["99"]),
    (("extract",), "model-missing", ["--model", "{root}/no-model", "--data", "{pairs}",
                                     "--output_dir", "{tmp}"], USER, ["no-model"]),
    # demo (its success path runs three real models for minutes: errors only)
    (("demo",), "n-zero", ["--n", "0"], USER, ["--n"]),
    (("demo",), "n-below-topk", ["--n", "5"], USER, ["--n 5", "--topk"]),
    (("demo",), "topk-zero", ["--topk", "0"], USER, ["--topk"]),
    (("demo",), "topk-one-cknna", ["--topk", "1", "--out", "{tmp}"], USER, ["--topk 1", "cknna"]),
    (("demo",), "batch-size-zero", ["--batch-size", "0"], USER, ["--batch-size"]),
    (("demo",), "null-permutations-negative", ["--null-permutations", "-1"], USER,
     ["--null-permutations"]),
    (("demo",), "out-is-a-file", ["--out", "{afile}"], USER, ["--out", "{afile}"]),
    (("demo",), "bad-device", ["--device", "toaster", "--out", "{tmp}"], USER,
     ["--device", "toaster"]),
    (("demo",), "unknown-metric", ["--metrics", "nope"], USER, ["--metrics"]),
    (("demo",), "n-above-data", ["--n", "100000", "--out", "{tmp}", "--no-progress"], USER,
     ["100000"]),
    # store info
    (("store", "info"), "pt-file", ["{a}"], OK, ['"n"']),
    (("store", "info"), "store", ["{store}"], OK, ['"n"']),
    (("store", "info"), "missing", ["{missing}"], USER, ["{missing}"]),
    (("store", "info"), "plain-folder", ["{emptydir}"], USER, ["{emptydir}"]),
    (("store", "info"), "corrupt", ["{corrupt}"], USER, ["{corrupt}"]),
    (("store", "info"), "no-feats-key", ["{nofeats}"], USER, ["{nofeats}"]),
    (("store", "info"), "bad-index-field", ["{badstore}"], USER, ["badstore", "'n'"]),
    (("store", "info"), "index-not-json", ["{junkstore}"], USER, ["junkstore"]),
    # store verify: exit 1 is its "verification failed" status, one FAILED line per path
    (("store", "verify"), "store", ["{store}", "--no-progress"], OK, ["ok", "complete"]),
    (("store", "verify"), "missing", ["{missing}", "--no-progress"], 1, ["{missing}"]),
    (("store", "verify"), "a-file", ["{a}", "--no-progress"], 1, ["{a}"]),
    (("store", "verify"), "plain-folder", ["{emptydir}", "--no-progress"], 1, ["{emptydir}"]),
    (("store", "verify"), "bad-index-field", ["{badstore}", "--no-progress"], 1,
     ["badstore", "'n'"]),
    (("store", "verify"), "truncated-shard", ["{truncstore}", "--no-progress"], 1,
     ["truncstore"]),
    # store convert
    (("store", "convert"), "pt-to-store-and-back", ["{a}", "{tmp}/s", "--no-progress",
                                                    "--shard-rows", "16"], OK, ["wrote"]),
    (("store", "convert"), "store-to-pt", ["{store}", "{tmp}/a.pt"], OK, ["wrote"]),
    (("store", "convert"), "src-missing", ["{missing}", "{tmp}/s"], USER, ["{missing}"]),
    (("store", "convert"), "src-corrupt", ["{corrupt}", "{tmp}/s", "--no-progress"], USER,
     ["{corrupt}"]),
    (("store", "convert"), "src-plain-folder", ["{emptydir}", "{tmp}/s"], USER, ["{emptydir}"]),
    (("store", "convert"), "dst-below-a-file", ["{a}", "{afile}/s", "--no-progress"], USER,
     ["{afile}"]),
    (("store", "convert"), "dst-exists", ["{store}", "{a}"], USER, ["{a}", "--overwrite"]),
    (("store", "convert"), "shard-rows-zero", ["{a}", "{tmp}/s", "--shard-rows", "0"], USER,
     ["--shard-rows"]),
    (("store", "convert"), "unknown-dtype", ["{a}", "{tmp}/s", "--dtype", "int3"], USER,
     ["--dtype"]),
]


def _fill(items, paths, tmp):
    return [s.format(tmp=tmp, **paths) for s in items]


def _check(cmd, rc, expected, out, err, must):
    where = f"prh-fast {' '.join(cmd)}"
    assert "Traceback" not in err, f"{where}: traceback\n{err}"
    assert rc == expected, f"{where}: exit {rc}, expected {expected}\n{out}\n{err}"
    if expected == OK:
        for m in must:
            assert m in out, f"{where}: {m!r} not in output\n{out}"
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"{where}: no message"
    # argparse prints its usage first; extract lists the models a set lacks after its line
    line = next((ln for ln in lines if ": error: " in ln or ln.startswith("FAILED ")), None)
    assert line is not None, f"{where}: no error line\n{err}"
    if "usage:" not in err and "not available here" not in line:
        assert len(lines) == 1, f"{where}: more than one line\n{err}"
    if not line.startswith("FAILED "):
        prog = "prh-fast" if "unrecognized arguments" in line else f"prh-fast {' '.join(cmd)}"
        assert line.startswith(f"{prog}: error: "), line
    for m in must:
        assert m in line, f"{where}: {m!r} not named in\n{line}"


@pytest.mark.parametrize("cmd,argv,expected,must",
                         [pytest.param(c, a, e, m, id="-".join(c) + ":" + i)
                          for c, i, a, e, m in CASES])
def test_case(cmd, argv, expected, must, paths, tmp_path, capsys):
    tmp = str(tmp_path / "work")
    argv = _fill(argv, paths, tmp)
    rc, out, err = run([*cmd, *argv], capsys)
    _check(cmd, rc, expected, out, err, _fill(must, paths, tmp))


def test_every_subcommand_has_cases():
    """Taken from the parser: a new subcommand needs a success case (or a reason it has none)
    and user-error cases here."""
    no_cheap_success = {("demo",): "runs three real models for minutes",
                        ("extract",): "tested with a tiny local model below"}
    found = [c for c, _ in commands()]
    assert {("info",), ("align",), ("store", "convert")} <= set(found)
    for cmd in found:
        ok = [c for c in CASES if c[0] == cmd and c[3] == OK]
        bad = [c for c in CASES if c[0] == cmd and c[3] != OK]
        assert ok or cmd in no_cheap_success, f"prh-fast {' '.join(cmd)}: no success case"
        assert len(bad) >= 2, f"prh-fast {' '.join(cmd)}: too few user-error cases"
    assert {c[0] for c in CASES} <= set(found), "cases for a subcommand that does not exist"


def _options(parser):
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.dest != "help":
            yield action


def test_numeric_options_are_checked_by_the_parser():
    """No option takes a bare int/float: each names itself when given a bad value."""
    for cmd, parser in commands():
        for action in _options(parser):
            assert action.type not in (int, float), (
                f"prh-fast {' '.join(cmd)} {action.option_strings[0]}: plain {action.type.__name__}"
                f" accepts values the command cannot use; use a checked type from prh_fast.cli")


def test_every_option_rejects_bad_values_in_one_line(capsys):
    """From the parser: every integer option below its minimum or not a number, every option
    with choices given an unknown one, and an unknown option, for every subcommand."""
    tried = 0
    for cmd, parser in commands():
        # required arguments given, so that argparse reaches the bad value
        need = []
        for action in parser._actions:
            if action.required:
                need += [action.option_strings[0], "x"] if action.option_strings else ["x"]
        bad = [(["--no-such-option"], "--no-such-option")]
        for action in _options(parser):
            opt = action.option_strings[0]
            bounds = getattr(action.type, "bounds", None)
            if bounds is not None:
                bad.append(([opt, "x1"], opt))
                bad.append(([opt, str(bounds[0] - 1)], opt))
            if action.choices is not None:
                bad.append(([opt, "no-such-choice"], opt))
        for argv, name in bad:
            rc, out, err = run([*cmd, *need, *argv], capsys)
            tried += 1
            assert rc == 2, (cmd, argv, err)
            assert "Traceback" not in err
            line = err.strip().splitlines()[-1]
            assert ": error: " in line and name in line, (cmd, argv, line)
    assert tried > 30


# ------------------------------------------------------------------------- the mechanism

def _raise(exc):
    def cmd(args):
        raise exc
    return cmd


@pytest.mark.parametrize("exc,code,text", [
    (ValueError("topk: expected an integer >= 1, got 0"), 2,
     "topk: expected an integer >= 1, got 0"),
    (FileNotFoundError(2, "No such file or directory", "/x/y.pt"), 2,
     "/x/y.pt: No such file or directory"),
    (IsADirectoryError(21, "Is a directory", "/x"), 2, "/x: Is a directory"),
    (PermissionError(13, "Permission denied", "/root/z"), 2, "/root/z: Permission denied"),
    (ModuleNotFoundError("No module named 'faiss'", name="faiss"), 2,
     "No module named 'faiss'"),
    (ValueError("first line\n  second line"), 2, "first line; second line"),
    (MemoryError("cannot allocate 80 GiB"), 2, "cannot allocate 80 GiB"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), 2, "CUDA out of memory."),
])
def test_user_errors_are_one_line(monkeypatch, capsys, exc, code, text):
    monkeypatch.setattr(cli, "_cmd_info", _raise(exc))
    rc, out, err = run(["info"], capsys)
    assert rc == code
    assert err == f"prh-fast info: error: {text}\n"


def test_library_error_classes_are_user_errors(monkeypatch, capsys):
    from prh_fast.distributed import DistributedError
    from prh_fast.extract._data import DataNotFoundError
    from prh_fast.extract._text import ModelNotAvailableError
    from prh_fast.store import StoreError

    for exc, code in ((StoreError("s: bad index"), 2), (DataNotFoundError("d: none"), 2),
                      (ModelNotAvailableError("m: not here"), 2),
                      (DistributedError("rank 1 died"), 1)):
        monkeypatch.setattr(cli, "_cmd_info", _raise(exc))
        rc, out, err = run(["info"], capsys)
        assert rc == code and err == f"prh-fast info: error: {exc}\n"


def test_nested_subcommand_is_named(monkeypatch, capsys):
    import prh_fast.cli_store as cli_store

    monkeypatch.setattr(cli_store, "_cmd_info", _raise(ValueError("p: broken")))
    rc, out, err = run(["store", "info", "p"], capsys)
    assert rc == 2 and err == "prh-fast store info: error: p: broken\n"


@pytest.mark.parametrize("exc", [RuntimeError("bug"), KeyError("bug"), TypeError("bug"),
                                 AttributeError("bug"), IndexError("bug"),
                                 ImportError("cannot import name 'x'", name="prh_fast.grid")])
def test_bugs_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "_cmd_info", _raise(exc))
    with pytest.raises(type(exc)):
        main(["info"])


def test_traceback_on_request(monkeypatch):
    monkeypatch.setattr(cli, "_cmd_info", _raise(ValueError("user error")))
    monkeypatch.setenv("PRH_FAST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="user error"):
        main(["info"])


def test_interrupt_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_info", _raise(KeyboardInterrupt()))
    rc, out, err = run(["info"], capsys)
    assert rc == 130 and err.strip() == "prh-fast info: interrupted"


# ------------------------------------------------------------------ extract with a tiny model

def test_extract_language_model_kind_and_success(paths, tmp_path, capsys):
    """A tiny local GPT-2: --modality language and text are the same kind; the file is made."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_extract_text import _model, _tokenizer

    tok = _tokenizer("gpt2")
    folder = tmp_path / "gpt2"
    _model("gpt2", len(tok)).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "feats"
    for modality in ("language", "text"):
        rc, o, err = run(["extract", "--modality", modality, "--model", str(folder), "--data",
                          paths["pairs"], "--output_dir", str(out), "--batch-size", "2",
                          "--no-progress"], capsys)
        assert rc == 0, err
        assert "Traceback" not in err
        written = o.strip().splitlines()[-1].split(": ", 1)[1]
        assert os.path.isfile(written) and written.endswith("_pool-avg_prompt-False.pt")
    from prh_fast.store import load_features

    assert load_features(written)["feats"].shape[0] == 4


# --------------------------------------------------------------------- as a user runs it

def _subprocess(*args, code=None):
    cmd = [sys.executable, "-m", "prh_fast.cli", *args] if code is None else \
        [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_subprocess_user_errors(paths):
    p = _subprocess("example", "--n", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        "prh-fast example: error: argument --n: expected an integer >= 1, got 0"
    p = _subprocess("align", "--x", paths["a"], "--y", paths["b"], "--output_dir",
                    paths["afile"], "--no-progress")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr == (f"prh-fast align: error: --output_dir {paths['afile']}: exists and is "
                        f"not a folder\n")


def test_subprocess_bug_shows_traceback():
    code = ("import sys, prh_fast.cli as c\n"
            "def boom(args): raise RuntimeError('a bug')\n"
            "c._cmd_info = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    p = _subprocess("info", code=code)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "RuntimeError: a bug" in p.stderr


def test_run_demo_checks_its_arguments_before_any_work(tmp_path):
    from prh_fast.demo import run_demo

    out = tmp_path / "demo"
    for kw, name in (({"n": 5}, "topk"), ({"topk": 1}, "cknna"), ({"batch_size": 0}, "batch_size"),
                     ({"null_permutations": -1}, "null_permutations"), ({"n": 0}, "n")):
        with pytest.raises(ValueError, match=name):
            run_demo(out, verbose=False, progress=False, **kw)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--help"], ["align", "--help"], ["demo", "--help"],
                                  ["extract", "--help"], ["store", "--help"],
                                  ["align", "--metric", "nope"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    """Help and argument errors answer before torch is imported (it takes seconds)."""
    code = ("import sys\n"
            "import prh_fast.cli\n"
            "try:\n"
            f"    prh_fast.cli.main({argv!r})\n"
            "except SystemExit as e:\n"
            "    status = e.code\n"
            "print('torch' in sys.modules, status)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    torch_loaded, status = out.stdout.split()[-2:]
    assert torch_loaded == "False", out.stdout + out.stderr
    assert status == ("2" if "nope" in argv else "0"), out.stdout + out.stderr


def test_import_prh_fast_loads_public_names_on_first_use():
    code = ("import sys\n"
            "import prh_fast\n"
            "before = 'torch' in sys.modules\n"
            "from prh_fast import align, knn, SUPPORTED_METRICS\n"
            "print(before, 'torch' in sys.modules, callable(align), callable(knn.knn),\n"
            "      SUPPORTED_METRICS is prh_fast.metrics.SUPPORTED_METRICS,\n"
            "      sorted(set(prh_fast.__all__) - set(dir(prh_fast))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False True True True True []", out.stdout + out.stderr


def test_submodules_are_attributes_of_the_package():
    """``prh_fast.store`` / ``grid`` / ``prepare`` work after a bare ``import prh_fast``."""
    code = ("import prh_fast\n"
            "print(prh_fast.store.open_store.__name__, prh_fast.grid.align_models.__name__,\n"
            "      prh_fast.prepare.prepare_features.__name__, prh_fast.testing.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["open_store", "align_models", "prepare_features",
                                  "prh_fast.testing"], out.stdout + out.stderr
