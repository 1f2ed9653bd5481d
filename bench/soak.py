"""Soak: the whole stack under a disordered mix of webhooks, sends, refunds and disputes while
a worker dies twice and Redis restarts once; then proof that every payment, refund and charge
was applied exactly once. The soak itself is bench/soak/ (main.py says what it does).

    .venv/bin/python bench/soak.py [--seconds 60] [--orgs 50] [--seed 1] [--rate 25]
                                   [--clients 6] [--database-url URL] [--keep]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.soak.main import main

if __name__ == "__main__":
    raise SystemExit(main())
