"""The error a user can fix: bad input, named.

A :class:`UsageError` is raised for what the person running cltrace can act on (a missing or
malformed file, an argument out of range, a transcoder set for another model, ...), with a
message that names the file, layer or argument. The command line prints it as one line and
exits with status 2; anything else is a bug or an environment failure and keeps its
traceback. It subclasses ``ValueError`` so that library callers that catch bad values keep
working.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input the user can fix (one line, exit status 2 on the command line)."""
