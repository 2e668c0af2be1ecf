"""The names a user chooses from are defined once (core.choices, torch-free): argparse offers
exactly them, the library's errors list exactly them, and every registered backend and loader
resolves to what its registry line names."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest
import torch

from apudae_engine.cli.main import build_parser
from apudae_engine.core import choices
from apudae_engine.core.errors import UserError

FLAGS = {"--method": choices.METHODS, "--backend": choices.BACKEND_CHOICES,
         "--precision": choices.PRECISIONS, "--loader": choices.LOADER_CHOICES}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _choices(parser: argparse.ArgumentParser, flag: str):
    action = parser._option_string_actions.get(flag)
    return None if action is None else tuple(action.choices)


def test_choices_import_no_torch():
    code = ("import sys, apudae_engine.core.choices\n"
            "heavy = [m for m in ('torch', 'numpy', 'PIL') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_purify_offers_exactly_the_registered_names():
    purify = _subcommands()["purify"]
    assert {flag: _choices(purify, flag) for flag in FLAGS} == FLAGS


def test_every_command_with_such_a_flag_offers_the_same_names():
    seen = set()
    for name, parser in _subcommands().items():
        for flag, expected in FLAGS.items():
            got = _choices(parser, flag)
            if got is not None:
                assert got == expected, (name, flag)
                seen.add(name)
    assert {"purify", "purify-ray", "verify", "serve", "evaluate"} <= seen
    evaluate = _subcommands()["evaluate"]
    assert _choices(evaluate, "--aware-target") == choices.DEFENSES[1:]
    classifier = _subcommands()["train-classifier"]
    assert _choices(classifier, "--arch") == choices.CLASSIFIER_ARCHS


def test_every_classifier_arch_is_a_built_architecture():
    from apudae_engine.method.models import ARCHITECTURES

    assert set(choices.CLASSIFIER_ARCHS) <= set(ARCHITECTURES)


def test_the_library_validates_against_the_same_names():
    from apudae_engine.backends.selection import unavailable_reason
    from apudae_engine.evaluation.config import DEFENSES, EvalConfig
    from apudae_engine.images.loaders import LOADERS, get_loader
    from apudae_engine.method.config import PurifyConfig

    with pytest.raises(ValueError, match=f"one of {', '.join(choices.METHODS)}, got 'x'"):
        PurifyConfig(method="x")
    with pytest.raises(UserError, match=f"unknown loader 'x'; choose "
                                        f"{', '.join(choices.LOADER_CHOICES)}$"):
        get_loader("x")
    assert unavailable_reason("x").endswith(", ".join(choices.BACKEND_CHOICES))
    assert unavailable_reason("reference", precision="x").endswith(
        ", ".join(choices.PRECISIONS))
    with pytest.raises(UserError, match=f"defenses: {', '.join(choices.DEFENSES)}$"):
        EvalConfig(defenses=("x",))
    assert DEFENSES is choices.DEFENSES and LOADERS is choices.LOADERS


@pytest.mark.parametrize("name", choices.LOADERS)
def test_each_registered_loader_is_a_loader_named_as_registered(name):
    from apudae_engine.images.loaders import Loader, loader_class

    cls = loader_class(name)
    assert issubclass(cls, Loader) and cls.name == name
    reason = cls.unavailable_reason(torch.device("cpu"))
    assert reason is None or isinstance(reason, str)


@pytest.mark.parametrize("name", choices.BACKENDS)
def test_each_registered_backend_module_has_the_interface(name):
    module = importlib.import_module(choices.BACKEND_MODULES[name])
    reason = module.unavailable_reason(torch.device("cpu"), "fp32")
    assert reason is None or isinstance(reason, str)
    if name != "reference":  # the specification runs without an engine
        assert callable(module.engine_for)
