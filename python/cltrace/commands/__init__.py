"""One module per ``cltrace`` subcommand (see :mod:`cltrace.cli`)."""
