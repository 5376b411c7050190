"""What the benchmarks record about the machine they ran on.

Example::

    from host import cpu_model      # benchmarks/ is the script's directory, so it is importable
    cpu_model()                     # "AMD EPYC 7B13", or "" where /proc/cpuinfo has no model name
"""

from __future__ import annotations


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "" where there is none (not Linux, no such line)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        return ""
