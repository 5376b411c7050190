"""Every zoo MoE block that fuses still fuses, the same, when the whole block is wrapped.

For each case of `tests.patterns.test_moe_zoo.FUSED` (whatever it lists) and each wrapper:
`jax.checkpoint` around the block, the block called through a `jax.jit`-wrapped helper from an
outer function, and the block called in the body of a `lax.scan` of length 2 (closed-over
arguments, stacked outputs). The Plan of the wrapped program must have the case's count of `moe`
sites with the case's dispatch and parameters, and `moefuse.jit(..., verify=True)` must give the
original's results (checked for the three wrappers at once: one program, one compile per side).
"""

from __future__ import annotations

import functools

import jax
import pytest
from jax import lax

import moefuse
from tests.patterns.test_moe_zoo import FUSED
from tests.zoo.moe_blocks import ALL_MOE_BLOCKS


def _name(make):
    return make.__name__.removeprefix("make_")


FUSED_BLOCKS = [m for m in ALL_MOE_BLOCKS if _name(m) in FUSED]

# The results check compiles each block twice: the default run keeps the first block of each
# dispatch, the slow tier runs the rest.
_DISPATCHES = {FUSED[_name(m)] for m in FUSED_BLOCKS}
_FIRST_OF_EACH_DISPATCH = {next(_name(m) for m in FUSED_BLOCKS if FUSED[_name(m)] == d) for d in _DISPATCHES}
RESULT_CASES = [
    m if _name(m) in _FIRST_OF_EACH_DISPATCH else pytest.param(m, marks=pytest.mark.slow)
    for m in FUSED_BLOCKS
]


@functools.cache
def _case(name):
    return next(m for m in ALL_MOE_BLOCKS if _name(m) == name)()


def under_checkpoint(fn):
    return jax.checkpoint(fn)


def through_jit_helper(fn):
    helper = jax.jit(fn)

    def model(*args):
        return helper(*args)

    return model


def in_scan_body(fn):
    def model(*args):
        def body(carry, _):
            return carry, fn(*args)  # args are closed over: constants of the scan body

        _, stacked = lax.scan(body, None, None, length=2)
        return stacked

    return model


# wrapper -> the primitive it must put at the top level of the traced program
WRAPPERS = {
    under_checkpoint: {"checkpoint", "remat", "remat2"},
    through_jit_helper: {"jit", "pjit"},
    in_scan_body: {"scan"},
}


def test_every_fused_case_is_a_zoo_block():
    """Guards the coverage below: a FUSED name with no zoo block would silently be skipped."""
    assert set(FUSED) <= {_name(m) for m in ALL_MOE_BLOCKS}
    assert FUSED_BLOCKS


def moe_sites(fn, args):
    plan = moefuse.plan(fn, *args)
    return [s for s in plan.fused if s.op == "moe"], plan


@pytest.mark.parametrize("wrap", list(WRAPPERS), ids=lambda w: w.__name__)
@pytest.mark.parametrize("make", FUSED_BLOCKS, ids=_name)
def test_wrapped_block_fuses_the_same(make, wrap):
    """The Plan of the wrapped block: the case's count of `moe` sites, dispatch and parameters."""
    case = _case(_name(make))
    fn = wrap(case.fn)
    top = {e.primitive.name for e in jax.make_jaxpr(fn)(*case.args).jaxpr.eqns}
    assert top & WRAPPERS[wrap], f"{wrap.__name__} did not wrap the block: {sorted(top)}"
    sites, plan = moe_sites(fn, case.args)
    assert len(sites) == case.count, str(plan)
    for site in sites:
        assert site.params["dispatch"] == FUSED[case.name], str(plan)
        for key in ("num_experts", "k", "activation"):
            assert site.params[key] == case.expect[key], (key, str(plan))


@pytest.mark.parametrize("make", RESULT_CASES, ids=_name)
def test_wrapped_blocks_give_the_original_results(make):
    """One program calls the block under all three wrappers (one compile of each side, to bound the
    time); every copy fuses, and verify=True compares each wrapper's outputs with the original's."""
    case = _case(_name(make))
    wrapped = [wrap(case.fn) for wrap in WRAPPERS]

    def model(*args):
        return tuple(w(*args) for w in wrapped)

    sites, plan = moe_sites(model, case.args)
    assert len(sites) == len(WRAPPERS) * case.count, str(plan)
    got = moefuse.jit(model, verify=True)(*case.args)  # raises VerificationError on any difference
    want = jax.eval_shape(model, *case.args)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
