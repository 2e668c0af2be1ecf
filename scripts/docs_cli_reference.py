"""The CLI reference page's body, generated from the ``apudae-engine`` argparse parser itself.

Every sub-command, argument group, flag, default, choice and help text on the page comes from
``apudae_engine.cli.main.build_parser()``, so the reference cannot drift from the command. The
docs build inserts it into docs/cli.md (scripts/docs_hooks.py); run this file to print it:

    python scripts/docs_cli_reference.py > /tmp/cli.md
"""

from __future__ import annotations

import argparse
import re
import sys

PROG = "apudae-engine"
MARKER = "<!-- cli-reference -->"  # where docs/cli.md takes the generated text
WIDTH = 96  # usage lines are wrapped at this width


def _escape(text: str) -> str:
    """Markdown-safe help text: code spans (`...`) are kept, elsewhere the characters Markdown
    would read as emphasis, tables or HTML are escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)
        else:
            out.append(re.sub(r"([*_|<>\[\]])", r"\\\1", part))
    return " ".join("".join(out).split())


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    formatter = parser._get_formatter()
    return formatter._expand_help(action)  # argparse's own %(default)s expansion


def _flags(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The flags as ``--help`` writes them (``-v, --verbose``; ``--loader {auto,cpu}``)."""
    formatter = parser._get_formatter()
    return ", ".join(f"`{s}`" for s in formatter._format_action_invocation(action).split(", "))


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    if action.required:
        return "required"
    if action.default is None or action.default == argparse.SUPPRESS:
        return "–"
    return f"`{action.default}`"


def _exclusive(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            others = [a.option_strings[0] for a in group._group_actions if a is not action]
            return "Not with " + ", ".join(f"`{o}`" for o in others) + "."
    return ""


def _row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = _escape(_help(parser, action))
    if text and _exclusive(parser, action):
        text = text.rstrip(".") + ". " + _exclusive(parser, action)
    return f"| {_flags(parser, action)} | {_default(action)} | {text or '–'} |"


def _skipped(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))


def _groups(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not _skipped(a)]
        if not actions:
            continue
        title = group.title or "options"
        lines += ["", f"**{title}**", "", "| option | default | description |",
                  "|---|---|---|"]
        lines += [_row(parser, a) for a in actions]
    return lines


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    # A fixed width, so the page does not depend on the terminal that builds it.
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return ["", "```text", formatter.format_help().strip(), "```"]


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each sub-command, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return out


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for every sub-command of ``parser`` (default: the ``apudae-engine`` parser)."""
    if parser is None:
        from apudae_engine.cli.main import build_parser

        parser = build_parser()
    commands = subcommands(parser)
    lines = ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#{name}) | {_escape(text)} |" for name, text, _ in commands]
    lines += ["", f"## `{PROG}`", *_usage(parser)]
    if parser.description:
        lines += ["", _escape(parser.description)]
    lines += _groups(parser)
    for name, text, sub in commands:
        lines += ["", f"## `{name}` {{#{name}}}", "", _escape(text[:1].upper() + text[1:]) + "."]
        if sub.description:
            lines += ["", _escape(sub.description)]
        lines += _usage(sub)
        lines += _groups(sub)
    return "\n".join(lines) + "\n"


def every_flag(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Every option string of the command and its sub-commands (what the reference must show)."""
    if parser is None:
        from apudae_engine.cli.main import build_parser

        parser = build_parser()
    flags = {s for a in parser._actions if not _skipped(a) for s in a.option_strings}
    for _, _, sub in subcommands(parser):
        flags |= {s for a in sub._actions if not _skipped(a) for s in a.option_strings}
    return flags


if __name__ == "__main__":
    sys.stdout.write(cli_reference())
