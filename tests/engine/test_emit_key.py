"""`emit_key`: the structural key under which sites share one type check of their fused op."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moefuse import rewrite, select
from moefuse.emit_key import emit_key
from moefuse.match import Proposal


def _vars(n: int) -> list:
    """n distinct jaxpr variables of type f32[4]."""
    closed = jax.make_jaxpr(lambda *xs: [x + 1.0 for x in xs])(*[jnp.zeros(4)] * n)
    return [e.outvars[0] for e in closed.jaxpr.eqns]


@dataclasses.dataclass(frozen=True)
class Params:
    scale: float
    dtype: str


def _make_emit(params: Params, a, b):
    pair = (a, b)  # closed over, as patterns close over the vars they bound

    def emit(kernel, x):
        assert len(pair) == 2
        return [(x * params.scale).astype(params.dtype)]

    return emit


def test_emits_equal_up_to_renaming_variables_share_a_key():
    a, b, c, d = _vars(4)
    p = Params(2.0, "float32")
    assert emit_key(_make_emit(p, a, b)) == emit_key(_make_emit(p, c, d))


def test_which_variables_are_the_same_is_part_of_the_key():
    a, b, c, _ = _vars(4)
    p = Params(2.0, "float32")
    assert emit_key(_make_emit(p, a, a)) != emit_key(_make_emit(p, b, c))


def test_closed_over_data_is_part_of_the_key():
    a, b = _vars(2)
    keys = {emit_key(_make_emit(p, a, b)) for p in (Params(2.0, "float32"), Params(3.0, "float32"),
                                                      Params(2.0, "bfloat16"))}
    assert len(keys) == 3 and None not in keys


def test_other_code_gets_another_key():
    a, b = _vars(2)
    p = Params(2.0, "float32")
    other = lambda kernel, x: [x * p.scale]  # noqa: E731
    assert emit_key(other) != emit_key(_make_emit(p, a, b)) and emit_key(other) is not None


def test_an_object_it_cannot_describe_gives_no_key():
    class Mutable:
        pass

    held = Mutable()
    assert emit_key(lambda kernel, x: [x, held]) is None


def test_a_shared_check_still_declines_each_wrongly_typed_site(monkeypatch):
    """Two sites with the same emit share one check: both get its decline; a third whose closure
    differs (output dtype right) is checked on its own and passes."""
    a, b, c, d = _vars(4)
    calls = []
    build = rewrite._build_problem
    monkeypatch.setattr(rewrite, "_build_problem", lambda p, k: calls.append(1) or build(p, k))
    monkeypatch.setattr(rewrite, "_TYPE_CHECKED", {})
    kernel = select.Kernel("xla")
    bad = Params(2.0, "bfloat16")

    def prop(params, x, y):
        return Proposal("op", 0, [x], [y], {}, emit=_make_emit(params, x, y))

    assert "fused op would give bfloat16" in rewrite._type_problem(prop(bad, a, b), kernel)
    assert "fused op would give bfloat16" in rewrite._type_problem(prop(bad, c, d), kernel)
    assert len(calls) == 1
    assert rewrite._type_problem(prop(Params(2.0, "float32"), c, d), kernel) is None
    assert len(calls) == 2
    np.testing.assert_equal(len(rewrite._TYPE_CHECKED), 2)
