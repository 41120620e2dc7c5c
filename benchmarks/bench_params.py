"""What the pytest-benchmark modules share: one test per (case, contender), named after both."""

from collections.abc import Callable, Iterable

import pytest


def contender_params(cases: Iterable, contenders: Callable[[object], Iterable[str]]) -> list:
    """``pytest.param(case, name)`` for every case and each of its ``contenders(case)``, with the id ``<case
    label>-<contender>`` (spaces as underscores), for ``@pytest.mark.parametrize("case, name", ...)``."""
    return [
        pytest.param(case, name, id=f"{case.label}-{name.replace(' ', '_')}")
        for case in cases
        for name in contenders(case)
    ]
