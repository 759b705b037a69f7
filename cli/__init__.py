"""The ``adaptermerge`` command line (installed as the ``adaptermerge_cli`` package)."""

from adaptermerge_cli.main import cli, main

__all__ = ["cli", "main"]
