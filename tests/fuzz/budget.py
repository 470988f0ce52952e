"""Example budgets of the fuzzers: small enough that the whole of tests/fuzz runs in about two
minutes of CI on two cores, scaled up for a long run with NINEP_FUZZ_SCALE (a float, default 1):

    NINEP_FUZZ_SCALE=50 .venv/bin/python -m pytest tests/fuzz -q

Every hypothesis fuzzer takes its `settings` from `fuzz_settings`, so one variable scales them all.
Deadlines are off: the machines are shared and slow examples are not failures.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings


def scale() -> float:
    try:
        return max(float(os.environ.get("NINEP_FUZZ_SCALE", "1")), 0.01)
    except ValueError:
        return 1.0


def examples(n: int) -> int:
    return max(1, int(n * scale()))


def fuzz_settings(n: int, **kw: Any) -> settings:
    """Settings for a fuzzer whose CI budget is `n` examples."""
    return settings(
        max_examples=examples(n),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
        **kw,
    )
