"""The real-model suite: third-party MoE layers (MaxText, EasyDeL, tpu-inference, SGLang-JAX) run
through moefuse, each library in its own cached Python 3.12 venv. See ``tests/real/README.md``.

Example::

    python tests/real/setup_venvs.py maxtext && python -m pytest -m real tests/real
"""
