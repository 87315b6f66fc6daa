"""Run a script (``sys.argv[1]``) with this process's wall clock one hour ahead: a node whose clock is skewed.

tests/test_multinode.py gives it to torchrun as one node's training script; only ``datetime.datetime.now`` moves.
"""

import datetime
import os
import runpy
import sys

_real = datetime.datetime


class _Skewed(_real):
    @classmethod
    def now(cls, tz=None):
        return _real.fromtimestamp(_real.now(tz).timestamp() + 3600, tz)


if __name__ == "__main__":
    datetime.datetime = _Skewed
    sys.argv = sys.argv[1:]
    # as `python <script>` would: the script's folder (the repository, for main.py) first on the import path,
    # not tests/, so the config's `tests.helpers` targets resolve without PYTHONPATH, as in CI
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
