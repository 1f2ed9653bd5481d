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


def _imported(module: str, path: Path) -> set[str]:
    """The dotted names `module` imports anywhere in its body (lazy imports included)."""
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
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def test_only_core_providers_import_a_vendor_sdk():
    offenders = [
        f"{module} imports {name}"
        for module, path in _modules("core").items()
        if not module.startswith("core.providers")
        for name in _imported(module, path)
        if _top(name) in VENDOR_SDKS
    ]
    assert offenders == []
