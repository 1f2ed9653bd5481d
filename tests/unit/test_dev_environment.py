"""What `payguard dev` hands every process: a /metrics token (generated unless given) and the
console Twilio backend allowed explicitly when no Twilio account is configured."""

from __future__ import annotations

from pathlib import Path

from devtools.devstack import dev_environment


def _env(monkeypatch, tmp_path: Path, **given: str) -> dict[str, str]:
    for name in ("METRICS_TOKEN", "TWILIO_ACCOUNT_SID", "TWILIO_CONSOLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    return dev_environment("postgresql://x@/y", "redis://127.0.0.1:1/0", tmp_path)


def test_the_dev_stack_makes_a_metrics_token_of_its_own(monkeypatch, tmp_path):
    first = _env(monkeypatch, tmp_path)["METRICS_TOKEN"]
    second = _env(monkeypatch, tmp_path)["METRICS_TOKEN"]

    assert len(first) >= 32 and first != second


def test_a_metrics_token_given_to_the_dev_stack_is_kept(monkeypatch, tmp_path):
    assert _env(monkeypatch, tmp_path, METRICS_TOKEN="mine")["METRICS_TOKEN"] == "mine"


def test_the_dev_stack_runs_the_worker_on_the_console_backend_without_twilio(monkeypatch, tmp_path):
    assert _env(monkeypatch, tmp_path)["TWILIO_CONSOLE"] == "1"
    with_twilio = _env(monkeypatch, tmp_path, TWILIO_ACCOUNT_SID="AC" + "1" * 32)
    assert "TWILIO_CONSOLE" not in with_twilio


def test_the_dev_harness_is_not_a_package_of_the_wheel():
    """devtools/ (embedded servers, the dev stack) stays in the checkout: pyproject.toml's
    package list, which decides what the wheel holds, does not take it in."""
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(root), include=include)

    assert "cli" in packages and "core" in packages
    assert not [p for p in packages if p.split(".")[0] in ("devtools", "tests", "bench")]
