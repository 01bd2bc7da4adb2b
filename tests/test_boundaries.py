"""The layers and adapters hold: `producer` never imports `workers`, and only the adapters reach
into arq's and mem0's insides; every other module uses their public entry points, listed here.

Read from the source (every import statement, a function's own imports included), so a module
that is never imported by a test is checked too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("producer", "workers")

# What a module outside the adapters may import from arq and mem0: their documented public API.
PUBLIC = {
    "arq": frozenset({
        "arq.Retry", "arq.func", "arq.create_pool",
        "arq.connections.ArqRedis", "arq.connections.RedisSettings",
        "arq.worker.Worker", "arq.worker.Function",
        "arq.jobs.Job", "arq.jobs.JobStatus",
    }),
    "mem0": frozenset({"mem0.AsyncMemoryClient", "mem0.MemoryClient"}),
}
# The modules that hold every other use of each library's insides.
ADAPTERS = {
    "arq": frozenset({"producer/arq_adapter.py", "workers/arq_worker.py"}),
    "mem0": frozenset({"workers/mem0_adapter.py"}),
}


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `path` imports: `import a.b` gives `a.b`, and
    `from a.b import c` gives `a.b.c`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def _uses_of(library: str) -> list[str]:
    found = []
    for path in _modules():
        where = path.relative_to(ROOT).as_posix()
        if where in ADAPTERS[library]:
            continue
        for line, name in _imported(path):
            if (name == library or name.startswith(library + ".")) and name not in PUBLIC[library]:
                found.append(f"{where}:{line} imports {name}")
    return found


def test_the_scan_sees_the_imports_it_guards() -> None:
    """A check that finds nothing must be a check that could: the adapters do import insides."""
    names = {name for path in ADAPTERS["arq"] | ADAPTERS["mem0"] for _, name in _imported(ROOT / path)}
    assert "arq.constants.job_key_prefix" in names and "mem0.exceptions.NetworkError" in names
    assert any(name.startswith("workers.") for path in _modules() for _, name in _imported(path)
               if path.is_relative_to(ROOT / "workers"))


@pytest.mark.parametrize("library", sorted(PUBLIC))
def test_only_the_adapters_use_a_librarys_insides(library: str) -> None:
    leaks = _uses_of(library)
    assert not leaks, (
        f"{library}'s insides used outside {sorted(ADAPTERS[library])}: {leaks}. Add what is needed to "
        "the adapter, or, if it is public API, to PUBLIC in this test"
    )


def test_the_producer_never_imports_the_workers() -> None:
    """The producer installs without mem0 and torch: `workers` imports `producer`, never the reverse."""
    leaks = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in (ROOT / "producer").rglob("*.py") for line, name in _imported(path)
             if name == "workers" or name.startswith("workers.")]
    assert not leaks, leaks
