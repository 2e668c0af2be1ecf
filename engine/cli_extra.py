"""Registry of sub-commands defined outside cli.py; each adds its own parser lazily."""

from __future__ import annotations

REGISTER: list = []
