"""Registry of sub-commands defined outside cli.py; each adds its own parser lazily."""

from __future__ import annotations

from . import cli_backends, cli_evaluate, cli_ray

REGISTER: list = [cli_evaluate.register, *cli_backends.REGISTER, cli_ray.register]
