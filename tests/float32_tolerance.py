"""How far apart two float32 computations of the same sum may honestly be.

Tests that compare a result computed two ways (another summation order, another kernel, chunks
against one pass, another CPU's vector width) must allow for float32 rounding, and no more. A sum
of ``n_terms`` float32 numbers is exact to within about ``n_terms * eps32`` times the size of what is
summed (the classical worst-case bound for recursive summation; blocked and vectorised sums do
better, which is why one machine's result says nothing about another's). Two such computations may
each err by that much in opposite directions: hence the factor 2. A tolerance taken from what one
CPU gave (``atol=1e-7``) fails on the next CPU; one derived here holds on any.

Pytest puts tests/ on ``sys.path`` (tests/conftest.py lives there), so tests import this module as
``from float32_tolerance import ...``.
"""

from __future__ import annotations

import numpy as np

#: float32 machine epsilon: the gap between 1 and the next float32 (2**-23).
EPS32 = float(np.finfo(np.float32).eps)


def sum_tolerance(n_terms: int, magnitude: float) -> float:
    """Largest difference between two float32 computations of a sum of ``n_terms`` terms of about
    ``magnitude``: ``2 * n_terms * eps32 * magnitude``."""
    if n_terms < 1 or magnitude < 0:
        raise ValueError(f"n_terms must be >= 1 and magnitude >= 0, got {n_terms} and {magnitude}")
    return 2.0 * n_terms * EPS32 * float(magnitude)
