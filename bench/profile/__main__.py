"""``python -m bench.profile``: the stage profile of one FastMEMatte forward (see
``bench/stage_profile.py``). A folder rather than ``bench/profile.py``: pytest puts
``bench/`` first on ``sys.path``, where a ``profile.py`` would hide the standard library's
``profile`` module from ``cProfile`` (which ``torch.compile`` imports)."""

import sys
from pathlib import Path

# bench/'s modules import each other by name (harness, report, worker); appended, so that
# they never shadow the standard library.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from stage_profile import main  # noqa: E402

main()
