"""Quantization-induced change and the spurious gap of CounterAnimal (``scoring.md`` §2.6, ``suites.md`` §4).

Pure metric functions (Wang et al., "A Sober Look at the Robustness of CLIPs to Spurious Features", NeurIPS
2024): the relative change ``δ``, the relative spurious gap ``RSG``, ``ΔRSG`` and the added vulnerability
``V_add``. The corrupted data these are measured on are made by :mod:`qbench.engine.corruptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbench.analysis import metrics
from qbench.errors import QbenchError

COUNTERANIMAL_CITATION = "Wang et al., A Sober Look at the Robustness of CLIPs to Spurious Features, NeurIPS 2024"

# --------------------------------------------------------------------------------------------------
# Relative change and spurious-gap metrics (scoring.md §2.6)
# --------------------------------------------------------------------------------------------------

IDENTITY_TOLERANCE = 1e-12


def _finite(value: float, what: str) -> float:
    number = float(value)
    if not np.isfinite(number):
        raise QbenchError(f"{what} must be a finite number, got {value!r}")
    return number


def relative_change(a_fp: float, a_q: float) -> float:
    """``δ(D) = (A_fp − A_q) / A_fp``; > 0 when quantization lost accuracy (``scoring.md`` §2.6).

    Undefined for ``A_fp = 0``: a one-line QbenchError (callers storing results record null instead,
    as :func:`qbench.analysis.metrics.relative_change` does, which this wraps).
    """
    value = metrics.relative_change(_finite(a_fp, "A_fp"), _finite(a_q, "A_q"))
    if value is None:
        raise QbenchError("relative change is undefined: the FP32 value A_fp is 0 (stored as null)")
    return value


def relative_spurious_gap(a_common: float, a_counter: float) -> float:
    """``RSG = (A_N − A_C) / A_N`` of one model on CounterAnimal (Wang et al., NeurIPS 2024).

    ``A_N``: accuracy on the common-background group, ``A_C``: on the counter-background group.
    Undefined (one-line QbenchError) when ``A_N = 0``.
    """
    a_n, a_c = _finite(a_common, "A_N"), _finite(a_counter, "A_C")
    if a_n == 0:
        raise QbenchError("relative spurious gap is undefined: the common-group accuracy A_N is 0 (stored as null)")
    return (a_n - a_c) / a_n


def delta_rsg(fp_common: float, fp_counter: float, q_common: float, q_counter: float) -> float:
    """``ΔRSG = RSG(q) − RSG(fp)``; > 0 when quantization widened the spurious gap (``scoring.md`` §2.6)."""
    return relative_spurious_gap(q_common, q_counter) - relative_spurious_gap(fp_common, fp_counter)


def added_vulnerability(fp_common: float, fp_counter: float, q_common: float, q_counter: float) -> float:
    """``V_add = δ_C − δ_N``: relative loss on the counter group minus that on the common group.

    > 0 when quantization hurt the counter (unusual-background) images more. Undefined when either
    FP32 group accuracy is 0.
    """
    return relative_change(fp_counter, q_counter) - relative_change(fp_common, q_common)


def delta_rsg_identity(rsg_fp: float, v_add: float, delta_common: float) -> float:
    """The right-hand side ``(1 − RSG(fp))·V_add / (1 − δ_N)`` of the §2.6 identity, which equals ΔRSG.

    Derivation: ``A_C^q = A_C^fp (1 − δ_C)``, ``A_N^q = A_N^fp (1 − δ_N)``, so
    ``ΔRSG = A_C^fp/A_N^fp − A_C^q/A_N^q = (1 − RSG(fp)) · (δ_C − δ_N)/(1 − δ_N)``.
    ``δ_N = 1`` means ``A_N^q = 0``, where RSG(q) itself is undefined.
    """
    rsg, v, d_n = _finite(rsg_fp, "RSG(fp)"), _finite(v_add, "V_add"), _finite(delta_common, "δ_N")
    if d_n == 1:
        raise QbenchError("ΔRSG identity is undefined: δ_N = 1 (the quantized common-group accuracy is 0)")
    return (1.0 - rsg) * v / (1.0 - d_n)


@dataclass(frozen=True)
class SpuriousGap:
    """CounterAnimal summary of one FP32/quantized pair; ``None`` marks a quantity undefined by a zero accuracy."""

    fp_common: float
    fp_counter: float
    q_common: float
    q_counter: float
    delta_common: float | None
    delta_counter: float | None
    rsg_fp: float | None
    rsg_q: float | None
    delta_rsg: float | None
    v_add: float | None
    identity_residual: float | None


def _or_none(function, *args: float) -> float | None:
    try:
        return function(*args)
    except QbenchError:
        return None


def spurious_gap(fp_common: float, fp_counter: float, q_common: float, q_counter: float) -> SpuriousGap:
    """Every §2.6 CounterAnimal quantity at once, with null for the undefined ones (the stored form).

    ``identity_residual`` is ``ΔRSG − (1 − RSG(fp))·V_add/(1 − δ_N)``, which must stay within
    :data:`IDENTITY_TOLERANCE`; a larger residual means the inputs were not the four group accuracies
    of one pair and is a one-line QbenchError.
    """
    d_n = _or_none(relative_change, fp_common, q_common)
    d_c = _or_none(relative_change, fp_counter, q_counter)
    rsg_fp = _or_none(relative_spurious_gap, fp_common, fp_counter)
    rsg_q = _or_none(relative_spurious_gap, q_common, q_counter)
    d_rsg = None if rsg_fp is None or rsg_q is None else rsg_q - rsg_fp
    v_add = None if d_n is None or d_c is None else d_c - d_n
    residual = None
    if d_rsg is not None and v_add is not None and d_n is not None and rsg_fp is not None and d_n != 1:
        residual = d_rsg - delta_rsg_identity(rsg_fp, v_add, d_n)
        if abs(residual) > IDENTITY_TOLERANCE * max(1.0, abs(d_rsg)):
            raise QbenchError(f"ΔRSG identity violated by {residual:.3e} (> {IDENTITY_TOLERANCE:g}); check the group accuracies")
    return SpuriousGap(
        float(fp_common), float(fp_counter), float(q_common), float(q_counter),
        d_n, d_c, rsg_fp, rsg_q, d_rsg, v_add, residual,
    )
