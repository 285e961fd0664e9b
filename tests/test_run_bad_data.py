"""``fedkern run`` on bad data: a clear error naming the file and the line, never a traceback;
and metrics files that are either complete or absent (written to a temporary name, renamed)."""

from __future__ import annotations

import json
import re

import pytest

from fedkern import cli, data
from fedkern import run as fedrun

GOOD = "+1 1:0.5 3:2\n-1 2:1.0\n+1 1:-1 2:3 3:1\n-1 1:2 3:-1\n+1 2:0.5\n-1 1:1 2:1\n"


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "line, match",
    [
        ("+1 1:0.5 3:x", r":3: not LibSVM format \('3:x' is not index:value"),
        ("+1 1:0.5 3", r":3: not LibSVM format \('3' is not index:value"),
        ("yes 1:0.5", r":3: not LibSVM format \(label 'yes' is not a number\)"),
        ("nan 1:0.5", r":3: label 'nan' is not a finite number"),
        ("+1 1:nan", r":3: feature 1 is nan; features must be finite"),
        ("+1 2:inf", r":3: feature 2 is inf; features must be finite"),
        ("+1 0:1.0", r":3: feature indices are 1-based, got 0"),
        ("+1 2:1 2:3", r":3: feature 2 appears twice on the line"),
        ("3 1:1.0", r":3: label 3 is outside the binary label sets"),
    ],
)
def test_loader_names_file_and_line(tmp_path, line, match):
    f = tmp_path / "bad.libsvm"
    lines = GOOD.splitlines()
    lines.insert(2, line)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(f)) + match):
        data.load_libsvm(f, binary=True)


def test_loader_binary_sets_and_multiclass(tmp_path):
    f = tmp_path / "multi.libsvm"
    f.write_text("1 1:1\n2 1:2\n3 1:3\n")
    _, y = data.load_libsvm(f)  # multiclass is fine without binary=True
    assert y.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"multi.libsvm:3: label 3 is outside"):
        data.load_libsvm(f, binary=True)
    f.write_text("2 1:1\n1 1:2\n")
    assert data.load_libsvm(f, binary=True)[1].tolist() == [1, 0]  # 1/2 -> 0/1


def test_loader_rejects_binary_and_empty_files(tmp_path):
    f = tmp_path / "blob.libsvm"
    f.write_bytes(b"+1 1:0.5\n\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match=r"blob.libsvm:2: not a text file"):
        data.load_libsvm(f)
    f.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"blob.libsvm: no samples"):
        data.load_libsvm(f)


@pytest.mark.parametrize(
    "content, match",
    [
        (GOOD + "+1 1:nan\n", r"--dataset: .*bad.libsvm:7: feature 1 is nan"),
        (GOOD + "5 1:1\n", r"--dataset: .*bad.libsvm:7: label 5 is outside the binary label sets"),
        (GOOD.replace("3:2", "3:two"), r"--dataset: .*bad.libsvm:1: not LibSVM format"),
        ("+1 1:1\n+1 1:2\n+1 2:1\n", r"has a single label; logistic regression needs two"),
        ("", r"bad.libsvm: no samples"),
    ],
)
def test_cli_run_reports_bad_data(tmp_path, capsys, content, match):
    f = tmp_path / "bad.libsvm"
    f.write_text(content)
    out = tmp_path / "out"
    rc, _, err = run_cli(["run", "gd", "--dataset", f"libsvm:{f}", "--clients", "2", "--rounds",
                          "2", "--out", str(out), "--no-progress"], capsys)  # fmt: skip
    assert rc == 2, err
    assert re.search(match, err), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_cli_run_reports_missing_file(tmp_path, capsys):
    rc, _, err = run_cli(["run", "gd", "--dataset", f"libsvm:{tmp_path / 'none.svm'}"], capsys)
    assert rc == 2 and "cannot read" in err and "none.svm" in err


def test_cli_run_good_libsvm_file(tmp_path, capsys):
    f = tmp_path / "good.libsvm"
    f.write_text(GOOD)
    out = tmp_path / "out"
    rc, _, err = run_cli(["run", "gd", "--dataset", f"libsvm:{f}", "--clients", "2", "--rounds",
                          "3", "--split", "iid", "--out", str(out), "--no-progress"],
                         capsys)  # fmt: skip
    assert rc == 0, err
    assert len(json.loads((out / "metrics.json").read_text())["results"]["gd"]["gap"]) == 4


def test_metrics_written_atomically(tmp_path, monkeypatch, capsys):
    """A crash while writing leaves no file under the final name (nor a stray temporary one), and
    an earlier complete metrics.json survives it."""
    out = tmp_path / "out"
    argv = ["run", "gd", "--clients", "4", "--rounds", "2", "--out", str(out), "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    complete = (out / "metrics.json").read_text()
    json.loads(complete)

    def broken_dump(obj, fh, **kw):
        fh.write('{"meta": {"partial": ')  # a partial document, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(fedrun.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        cli.main(argv)
    assert (out / "metrics.json").read_text() == complete
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "metrics.csv", "suboptimality.png"]
    )
    (out / "metrics.json").unlink()
    with pytest.raises(OSError, match="disk full"):
        cli.main(argv)
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
