"""The reference docs say what the code does: checked here, so that they stay true.

- docs/configuration.md lists every setting of every settings class (`ProducerSettings`,
  `WorkerConfig`, `ApiSettings`), by the variable it is read from, with its default.
- docs/python-api.md names as errors exactly the exceptions `producer.client` can raise;
- every file or directory a doc names (`producer/...`, `workers/...`) exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from producer.http.settings import ApiSettings
from producer.settings import ProducerSettings
from workers.settings import WorkerConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
_ROW = re.compile(r"^\| `([A-Z0-9_]+)`(?:, `[A-Z0-9_]+`)* \| ([^|]*) \|", re.MULTILINE)


def variable(model: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The environment variable a settings field is read from."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    prefix = str(model.model_config.get("env_prefix", ""))
    return f"{prefix}{name}".upper()


def documented_default(default: Any) -> str:
    if default is None or default == []:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, Path):
        return "`~/" + str(default.relative_to(Path.home())) + "`"
    return f"`{default}`"


def settings() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for model in (ProducerSettings, WorkerConfig, ApiSettings):
        for name, field in model.model_fields.items():
            found[variable(model, name, field)] = field.get_default(call_default_factory=True)
    return found


def test_configuration_lists_every_setting_with_its_default() -> None:
    text = (DOCS / "configuration.md").read_text()
    rows = {name: cell.strip() for name, cell in _ROW.findall(text)}
    expected = settings()
    assert sorted(set(expected) - set(rows)) == [], "settings missing from docs/configuration.md"
    assert sorted(set(rows) - set(expected)) == [], "docs/configuration.md lists variables no settings class reads"
    wrong = {name: (rows[name], documented_default(default)) for name, default in expected.items()
             if not rows[name].startswith(documented_default(default))}
    assert wrong == {}, "defaults in docs/configuration.md that are not the code's"


def _raised(path: Path) -> set[str]:
    """Names of the exception classes a module's `raise` statements name."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            names |= {n.id for n in ast.walk(node.exc) if isinstance(n, ast.Name)}
    return names


def test_python_api_names_the_errors_the_client_raises() -> None:
    import producer.errors as errors

    client = Path(errors.__file__).with_name("client")
    ours = {name for module in client.glob("*.py") for name in _raised(module)
            if isinstance(getattr(errors, name, None), type)}
    # Every request is parsed by the contract first, which raises InvalidRequest (InvalidUserId for ids).
    raised = ours | {"InvalidRequest"}
    table = (DOCS / "python-api.md").read_text().split("## Errors", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)`", table, re.MULTILINE))
    assert documented == raised


_PATH = re.compile(r"`((?:producer|workers|tests|bench|examples|docs)/[\w./-]*?)(?:::[\w\[\]-]+)?`")


def test_every_file_the_docs_name_exists() -> None:
    """A module split or moved leaves no doc pointing at where it was."""
    root = DOCS.parent
    named = {(doc.name, path) for doc in [*DOCS.glob("*.md"), root / "README.md"]
             for path in _PATH.findall(doc.read_text())}
    assert len(named) > 20, "the pattern finds the paths the docs name"
    missing = sorted((doc, path) for doc, path in named if not (root / path.rstrip("/")).exists())
    assert missing == []
