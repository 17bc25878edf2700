"""restwise.common: what every other package may import, and which imports nothing else from
Restwise: the error tree (``errors``), the exit-code registry (``exit_codes``), the CLIs'
one error-to-exit step (``cli_errors``) and atomic file writes (``fsutil``)."""
