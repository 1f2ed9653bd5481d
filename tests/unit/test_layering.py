"""The house's walls, read from the source (the AST), not from running it: which modules may
import what. A new import that breaks a wall fails here, naming the module and the import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Vendor SDKs of the providers: only core/providers/ may import them.
VENDOR_SDKS = {"paypalrestsdk", "stripe", "twilio"}


def _modules(package: str) -> dict[str, Path]:
    """Every module of `package` by dotted name."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, known: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The dotted names `module` imports anywhere in its body (lazy imports included).

    `from a import b` names `a.b` when that is one of the `known` modules, else `a`."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in known else base)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _offenders(package: str, forbidden: set[str], *, skip: str | None = None) -> list[str]:
    """ "module imports name" for each import by `package` (but its subpackage `skip`) of a
    top-level name in `forbidden`."""
    return [
        f"{module} imports {name}"
        for module, path in _modules(package).items()
        if not (skip and (module == skip or module.startswith(skip + ".")))
        for name in _imported(module, path)
        if _top(name) in forbidden
    ]


def test_only_core_providers_import_a_vendor_sdk():
    assert _offenders("core", VENDOR_SDKS, skip="core.providers") == []


PROJECT = ("core", "bus", "webhook_receiver", "worker", "cli")
ENTRYPOINTS = ("webhook_receiver", "worker", "cli")
# What core must never import: frameworks of the entrypoints, and the entrypoints themselves.
# (core uses no Redis: the rate limits and Twilio caps live in the entrypoints' adapters.)
NOT_IN_CORE = {"flask", "werkzeug", "celery", "kombu", "redis", "bus", *ENTRYPOINTS}


def _graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports (a package's name counts as its
    __init__; `from core import wallet` is an import of core.wallet)."""
    modules = {name: path for package in PROJECT for name, path in _modules(package).items()}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = {
            name
            for name in _imported(module, path, set(modules))
            if name in modules and name != module
        }
    return graph


def test_core_imports_no_framework_and_no_entrypoint():
    assert _offenders("core", NOT_IN_CORE) == []


def test_entrypoints_do_not_import_each_other():
    """The receiver, the worker and the CLI meet in core (and bus, to publish), never in one
    another: each can be read, run and changed alone. The CLI's dev stack starts the others
    as processes by name, which is no import. bus imports none of them."""
    offenders = [
        line
        for package in (*ENTRYPOINTS, "bus")
        for line in _offenders(package, set(ENTRYPOINTS) - {package})
    ]
    assert offenders == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the path that closes it, or None (depth-first, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_among_project_modules():
    """Lazy imports inside functions count too: a cycle hidden in a function is still two
    modules that cannot be understood apart."""
    assert _cycle(_graph()) is None


def test_the_cycle_search_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_module_that_applies_events_names_no_provider():
    """core/handlers.py applies provider-neutral events: a provider's quirk is a field of the
    event (core/providers/events.py), never a branch on the provider's name here."""
    path = ROOT / "core" / "handlers.py"
    named = [
        node.value
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and any(p in node.value.lower() for p in ("paypal", "stripe", "twilio"))
    ]
    assert named == []


# What an entrypoint must not do to run SQL of its own: SQL lives in core, as named statements
# (core/sql.py), and the entrypoints call the functions that run them.
RAW_SQL_CALLS = {"exec_driver_sql", "text"}


def _raw_sql(module: str, path: Path) -> list[str]:
    """Each way `module` runs SQL of its own, in the order of its lines: an import of
    sqlalchemy's `text`, a call of `text(` (or `sqlalchemy.text(`) or of `exec_driver_sql(`."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(), str(path))
    sqlalchemy_names = {"sqlalchemy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sqlalchemy_names.update(
                alias.asname or alias.name for alias in node.names if alias.name == "sqlalchemy"
            )
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _top(node.module or "") == "sqlalchemy":
            if any(alias.name == "text" for alias in node.names):
                found.append((node.lineno, "imports sqlalchemy's text"))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in RAW_SQL_CALLS:
                found.append((node.lineno, f"calls {func.id}("))
            elif isinstance(func, ast.Attribute) and (
                func.attr == "exec_driver_sql"
                or (
                    func.attr == "text"
                    and isinstance(func.value, ast.Name)
                    and func.value.id in sqlalchemy_names
                )
            ):
                found.append((node.lineno, f"calls {func.attr}("))
    return [f"{module}:{line} {what}" for line, what in sorted(found)]


def test_entrypoints_run_no_sql_of_their_own():
    """The receiver, the worker, the CLI and bus parse, call core and render: a statement
    they need is a function of core with a named statement, which the EXPLAIN test
    (tests/integration/test_sql_statements.py) plans against the schema."""
    offenders = [
        line
        for package in (*ENTRYPOINTS, "bus")
        for module, path in _modules(package).items()
        for line in _raw_sql(module, path)
    ]
    assert offenders == []


def test_the_raw_sql_check_sees_each_way_of_running_sql(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import sqlalchemy as sa\n"
        "from sqlalchemy import Connection, text\n"
        "def f(conn):\n"
        "    conn.execute(text('SELECT 1'))\n"
        "    conn.execute(sa.text('SELECT 1'))\n"
        "    conn.exec_driver_sql('SELECT 1')\n"
        "    return response.text()\n"  # not SQL: another object's text
    )
    assert _raw_sql("m", path) == [
        "m:2 imports sqlalchemy's text",
        "m:4 calls text(",
        "m:5 calls text(",
        "m:6 calls exec_driver_sql(",
    ]
