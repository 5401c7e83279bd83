"""What the command line does with an exception: a UsageError (or a file the user named that
cannot be read or written) is one line and exit 2; a bug keeps its traceback; Ctrl-C is one
line saying what it interrupted, exit 130."""
from __future__ import annotations

import pytest

from cltrace import cli
from cltrace.commands import _common
from cltrace.errors import UsageError


def run_with(monkeypatch, command: str, argv: list[str], error: BaseException):
    """``cltrace command argv`` whose work raises ``error`` after one progress message."""
    import importlib

    mod = importlib.import_module(f"cltrace.commands.{command}")

    def run(args):
        _common.messenger(quiet=True)("loading model gemma-3-270m ...")
        raise error

    monkeypatch.setattr(mod, "run", run)
    return cli.main([command, *argv])


def test_usage_error_is_one_line_exit_2(monkeypatch, capsys):
    assert run_with(monkeypatch, "attribute", ["x"], UsageError("--out x: bad")) == 2
    err = capsys.readouterr().err
    assert err == "cltrace attribute: error: --out x: bad\n"


def test_a_missing_file_is_one_line_exit_2(monkeypatch, capsys):
    assert run_with(monkeypatch, "attribute", ["x"], FileNotFoundError("graph x.json: no such file")) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError that is not a UsageError is a bug: it propagates (with its traceback)
    instead of being reported as bad input."""
    with pytest.raises(ValueError, match="internal"):
        run_with(monkeypatch, "attribute", ["x"], ValueError("internal invariant broken"))
    with pytest.raises(ZeroDivisionError):
        run_with(monkeypatch, "batch", ["p.txt", "--out", "o"], ZeroDivisionError())


def test_ctrl_c_is_one_line_naming_the_step(monkeypatch, capsys):
    assert run_with(monkeypatch, "attribute", ["x"], KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cltrace attribute: interrupted (loading model gemma-3-270m)" in err
    assert "run it again to resume" in err
    # train says how to resume (--resume) and what the loop reported
    assert run_with(monkeypatch, "train", ["--out", "o"],
                    KeyboardInterrupt("interrupted at step 7; checkpoint o.checkpoint.pt")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 7" in err and "--resume" in err and err.count("\n") == 1


def test_library_bad_input_is_a_usage_error():
    """The errors a user can fix are UsageErrors all the way down (and still ValueErrors, for
    callers that catch those)."""
    from cltrace.graph import PruneSettings
    from cltrace.pipeline import check_slug

    with pytest.raises(UsageError, match="--edge-threshold"):
        PruneSettings(0.8, 1.5).check()
    with pytest.raises(UsageError, match="--slug"):
        check_slug("a/b")
    assert issubclass(UsageError, ValueError)
    from cltrace.transcoders.checks import TranscoderLoadError

    assert issubclass(TranscoderLoadError, UsageError)
