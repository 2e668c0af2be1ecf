"""The apudae-engine command: argument parsing only; each sub-command calls a library function."""

from apudae_engine.cli.main import main

__all__ = ["main"]
