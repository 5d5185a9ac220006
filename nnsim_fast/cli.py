"""The ``nnsim-fast`` console entry point; the command itself is :mod:`nnsim_fast.app.cli`."""
from .app.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
