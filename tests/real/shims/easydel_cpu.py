"""Let EasyDeL 0.3.0 import on CPU without torch.

EasyDeL patches a few torch-only HuggingFace modeling modules at import time; without torch,
``transformers`` raises ImportError from those modules' placeholder objects, which EasyDeL does not
catch. Empty stand-in modules (in ``sys.modules`` and as the package attribute) make each patch find
nothing and return. ``EASYDEL_AUTO=0`` keeps it from appending GPU-only XLA flags, which abort XLA:CPU.

    from tests.real.shims import easydel_cpu
    easydel_cpu.activate()
    import easydel
"""

from __future__ import annotations

import importlib
import os
import sys
import types

TORCH_ONLY_MODULES = (
    "transformers.models.dbrx.modeling_dbrx",
    "transformers.models.glm4v_moe.modeling_glm4v_moe",
    "transformers.models.llama4.modeling_llama4",
    "transformers.models.phimoe.modeling_phimoe",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.qwen3_next.modeling_qwen3_next",
)


def activate() -> None:
    """Set EasyDeL's CPU environment and install the stand-in modules (idempotent)."""
    os.environ["EASYDEL_AUTO"] = "0"
    for name in TORCH_ONLY_MODULES:
        stand_in = sys.modules.setdefault(name, types.ModuleType(name))
        parent, _, leaf = name.rpartition(".")
        # transformers' lazy package would hand out its torch-requiring placeholder for the attribute.
        setattr(importlib.import_module(parent), leaf, stand_in)
