"""Fused ops used by moefuse rewrites: one package per op, each with a pure-jnp reference."""
