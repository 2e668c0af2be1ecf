"""Registry of sub-commands defined outside cli.py; each adds its own parser lazily."""

from __future__ import annotations

from . import cli_backends

REGISTER: list = [*cli_backends.REGISTER]
