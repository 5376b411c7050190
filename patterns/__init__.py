"""What Mixture-of-Experts code looks like: one module per stage, each a `moefuse.match.Pattern`.

from moefuse.patterns import PATTERNS, supported_table
print(supported_table())
"""

from moefuse.patterns.router import ROUTER
from moefuse.patterns.router import SUPPORTED as _ROUTER_SUPPORTED

PATTERNS = (ROUTER,)


def supported_table() -> str:
    """The supported-patterns table (Markdown), as shown in the README."""
    rows = ["| op | family | recognised spellings | bound parameters |", "|---|---|---|---|"]
    for op, family, spellings, params in _ROUTER_SUPPORTED:
        rows.append(f"| `{op}` | {family} | {spellings} | {params} |")
    return "\n".join(rows)
