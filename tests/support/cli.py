"""Checks of the command line's output, shared by the command tests."""
from __future__ import annotations


def one_line_error(capsys, *needles: str) -> str:
    """stderr is one line holding every needle (and no traceback); returns it."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err
