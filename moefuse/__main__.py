"""``python -m moefuse``: the same as the ``moefuse`` command.

Example::

    python -m moefuse explain path/to/model.py:target --json
"""

from moefuse.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
