"""The ``fedplan`` command line: ``main`` (the console script) and its ``status`` subcommand."""
