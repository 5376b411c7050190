"""moefuse's tests: ``engine/``, ``patterns/``, ``kernels/`` mirror the package; ``zoo/`` holds the
spelling and near-miss zoos shared by them (imported as ``tests.zoo``).

Example::

    python -m pytest tests/engine -k cli
"""
