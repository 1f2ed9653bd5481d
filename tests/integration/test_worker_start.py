"""A worker without Twilio credentials would "send" through the console backend, which only
logs, and capture every hold: it refuses to start unless TWILIO_CONSOLE=1 says that is meant
(the dev stack and tests that run workers without Twilio)."""

from __future__ import annotations

import subprocess

from tests.stack import BIN, start_worker


def worker_argv() -> list[str]:
    return [
        str(BIN / "celery"), "-A", "worker.celery_app:app", "worker", "--loglevel=INFO",
        "--concurrency=1", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def test_a_worker_without_twilio_and_without_the_console_flag_refuses_to_start(app_env):
    env = {k: v for k, v in app_env.items() if not k.startswith("TWILIO_")}

    run = subprocess.run(worker_argv(), env=env, capture_output=True, text=True, timeout=60)

    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "TWILIO_ACCOUNT_SID" in line]
    assert len(lines) == 1, run.stderr
    assert "TWILIO_CONSOLE" in lines[0]
    assert "Traceback" not in run.stderr


def test_a_worker_with_the_console_flag_runs(app_env, tmp_path):
    env = {k: v for k, v in app_env.items() if not k.startswith("TWILIO_")}
    env["TWILIO_CONSOLE"] = "1"

    with start_worker(env, tmp_path) as worker:
        assert worker.alive()
        assert "console backend" in worker.log()


def test_the_test_environment_runs_workers_on_the_console_backend(app_env):
    assert app_env["TWILIO_CONSOLE"] == "1"
    assert "TWILIO_ACCOUNT_SID" not in app_env
