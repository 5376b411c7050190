"""Import shims that let third-party MoE libraries import on a CPU-only machine without torch.

Each shim is activated by a case's ``build()`` (never at import of a case module)::

    from tests.real.shims import easydel_cpu
    easydel_cpu.activate()
    import easydel
"""
