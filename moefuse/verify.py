"""Output comparison for `moefuse.jit(..., verify=True)`.

Integer outputs (expert ids) must be equal exactly; floating outputs within the dtype's
tolerance (a few ulps relative, plus one ulp of the output's largest magnitude absolute, since
a sum of rounded terms errs at the scale of its terms), NaN and inf exactly where the original has
them (a mismatch is reported apart, with which side has the NaN)::

    check_outputs(expected_tree, got_tree)   # raises VerificationError with a diff summary
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (rtol, atol) per floating dtype: a few ulps of accumulated rounding, never looser.
TOLERANCES = {
    "float64": (1e-12, 1e-12),
    "float32": (1e-5, 1e-6),
    "bfloat16": (1.6e-2, 1e-3),
    "float16": (2e-3, 1e-4),
}


class VerificationError(AssertionError):
    """The fused program's outputs differ from the original's."""


def check_outputs(expected: Any, got: Any) -> None:
    exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    if exp_tree != got_tree:
        raise VerificationError(f"output structure differs: {exp_tree} vs {got_tree}")
    problems = []
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        e, g = np.asarray(e), np.asarray(g)
        if e.shape != g.shape or e.dtype != g.dtype:
            problems.append(f"output {i}: {g.dtype}{list(g.shape)} instead of {e.dtype}{list(e.shape)}")
            continue
        if not np.issubdtype(e.dtype, np.inexact) and e.dtype.name not in TOLERANCES:
            bad = e != g
            if bad.any():
                problems.append(
                    f"output {i} ({e.dtype}): {int(bad.sum())} of {e.size} elements differ "
                    f"(first at {np.argwhere(bad)[0].tolist()}: {e[bad][0]} vs {g[bad][0]})"
                )
            continue
        rtol, atol = TOLERANCES.get(e.dtype.name, (1e-5, 1e-6))
        e64, g64 = e.astype(np.float64), g.astype(np.float64)
        finite = np.abs(e64[np.isfinite(e64)])
        # one unit of rounding at the output's own scale: sums of rounded terms err by that much
        atol = max(atol, float(jnp.finfo(e.dtype).eps) * (float(finite.max()) if finite.size else 0.0))
        close = np.isclose(g64, e64, rtol=rtol, atol=atol, equal_nan=True)
        nonfinite = ~close & ~(np.isfinite(e64) & np.isfinite(g64))
        if nonfinite.any():
            problems.append(f"output {i} ({e.dtype}): " + _nonfinite_summary(e64, g64, nonfinite))
        outside = ~close & ~nonfinite
        if outside.any():
            err = float(np.abs(g64[outside] - e64[outside]).max())
            problems.append(
                f"output {i} ({e.dtype}): {int(outside.sum())} of {e.size} elements outside "
                f"rtol={rtol} atol={atol}, max abs diff {err:.3g}"
            )
    if problems:
        raise VerificationError("moefuse verify failed:\n  " + "\n  ".join(problems))


def _nonfinite_summary(expected: np.ndarray, got: np.ndarray, bad: np.ndarray) -> str:
    """How `got` and `expected` disagree about NaN and inf at the positions `bad`."""
    nan_original = int((bad & np.isnan(expected) & ~np.isnan(got)).sum())
    nan_fused = int((bad & np.isnan(got) & ~np.isnan(expected)).sum())
    inf = int(bad.sum()) - nan_original - nan_fused
    counts = [
        f"{n} {what}"
        for n, what in [
            (nan_original, "NaN in the original only"),
            (nan_fused, "NaN in the fused only"),
            (inf, "inf mismatches (inf against finite or -inf)"),
        ]
        if n
    ]
    first = tuple(np.argwhere(bad)[0].tolist())
    return (
        f"{int(bad.sum())} of {bad.size} elements differ in NaN/inf ({', '.join(counts)}); "
        f"first at {list(first)}: original {expected[first]}, fused {got[first]}"
    )
