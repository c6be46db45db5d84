"""The sans-IO packages stay pure: no I/O, no clock, no threads, directly or through us.

How this works: parse every source file of a pure package with `ast` (nothing
is imported, so a module's side effects cannot hide anything), collect every
import, including those under `if TYPE_CHECKING:` and inside functions, and
follow imports of other haproxy_ln modules (and the package `__init__` files
that importing them runs) transitively. Third-party and standard-library
modules are not followed: the rule is about what our code reaches for.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = ["haproxy_ln.ha", "haproxy_ln.replication", "haproxy_ln.pgwire"]
FORBIDDEN = frozenset(
    {
        "trio",
        "asyncpg",
        "trio_asyncio",
        "socket",
        "time",
        "asyncio",
        "select",
        "threading",
        "subprocess",
        "os",
    }
)


def module_file(module: str) -> Path | None:
    """The source file of a haproxy_ln module or package, or None if there is none."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_by(module: str, path: Path) -> Iterator[str]:
    """Every module name `path` (the source of `module`) imports, resolved to absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            yield source
            for alias in node.names:  # `from pkg import submodule`
                if module_file(f"{source}.{alias.name}") is not None:
                    yield f"{source}.{alias.name}"


def with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def forbidden_imports(package: str) -> list[str]:
    """Each forbidden import reachable from `package`, as a chain of module names."""
    start = [f"{package}.{p.stem}" for p in sorted(module_file(package).parent.glob("*.py"))]  # type: ignore[union-attr]
    found: list[str] = []
    chains: dict[str, list[str]] = {}
    todo = [(m.removesuffix(".__init__"), [m.removesuffix(".__init__")]) for m in start]
    while todo:
        module, chain = todo.pop()
        if module in chains:
            continue
        chains[module] = chain
        path = module_file(module)
        if path is None:
            continue
        for name in imported_by(module, path):
            if name.split(".")[0] in FORBIDDEN:
                found.append(" -> ".join([*chain, name]))
            elif name.split(".")[0] == "haproxy_ln":
                for step in with_parents(name):
                    todo.append((step, [*chain, step]))
    return sorted(set(found))


@pytest.mark.parametrize("package", PURE)
def test_pure_package_reaches_no_io_clock_or_threads(package: str) -> None:
    assert forbidden_imports(package) == []


def test_the_check_sees_direct_relative_and_transitive_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The walker itself must be able to fail: run it over a throwaway package tree.
    fake = tmp_path / "haproxy_ln"
    (fake / "pure").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "pure" / "__init__.py").write_text("")
    (fake / "pure" / "a.py").write_text("from . import b\nfrom typing import TYPE_CHECKING\n")
    (fake / "pure" / "b.py").write_text("from haproxy_ln import shell\n")
    (fake / "shell.py").write_text("def f() -> None:\n    import time.clock\n")
    (fake / "pure" / "c.py").write_text("if False:\n    from os import path\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = forbidden_imports("haproxy_ln.pure")
    assert {tuple(chain.split(" -> ")[-2:]) for chain in found} == {
        ("haproxy_ln.shell", "time.clock"),
        ("haproxy_ln.pure.c", "os"),
    }
    assert all(chain.startswith("haproxy_ln.pure.") for chain in found)
