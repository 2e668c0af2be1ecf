"""The architecture as tests: no module imports another's private names, and no import circles.

The layers themselves are an import-linter contract in pyproject.toml (``lint-imports``); these
two rules are what it does not check. Imports inside functions count too: a lazy import that
closes a circle still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"apudae_engine": ROOT / "engine", "apudae_kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the project's code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] in PACKAGES:
                out.append((base, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names
                    if a.name.split(".")[0] in PACKAGES]
    return out


def test_no_module_imports_another_modules_private_names():
    offences = []
    for name, path in _modules().items():
        for target, names, line in _imports(name, path):
            offences += [f"{path.relative_to(ROOT)}:{line} takes {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
    assert not offences, "private names imported across modules:\n" + "\n".join(offences)


def test_no_import_circles():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names, _ in _imports(name, path):
            # "from pkg import mod" names a module; "from mod import obj" names the module.
            subs = {f"{target}.{n}" for n in names} & mods.keys()
            deps = subs or ({target} & mods.keys())
            # A package's __init__ re-exporting its own modules is not a circle.
            graph[name] |= {d for d in deps if d != name and not name.startswith(d + ".")
                            and not (path.name == "__init__.py" and d.startswith(name + "."))}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_sub_package_says_what_lives_there():
    for folder in (ROOT / "engine").iterdir():
        init = folder / "__init__.py"
        if folder.is_dir() and init.is_file():
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and "\n" not in doc.strip(), f"{init}: needs a one-line docstring"
