"""``MEMATTE_TRITON_AUTOTUNE=0``: every autotuned kernel runs the first config its pruning
leaves (the lists put the sm_80/sm_90 choice first) instead of benchmarking them all.

For runs that cannot spend the first call's tuning time, e.g. a short GPU report on a fresh
machine; set it before the package is imported.
"""

from __future__ import annotations

import os
import sys

from triton.runtime.autotuner import Autotuner


def requested() -> bool:
    return os.environ.get("MEMATTE_TRITON_AUTOTUNE") == "0"


def apply(package: str) -> list[Autotuner]:
    """Cut each autotuned kernel of the modules imported from ``package`` to one config;
    returns the kernels cut."""
    modules = [m for name, m in list(sys.modules.items()) if name.startswith(package + ".")]
    tuners = [obj for module in modules for obj in vars(module).values() if isinstance(obj, Autotuner)]
    for tuner in tuners:
        prune = tuner.prune_configs
        tuner.prune_configs = lambda kwargs, prune=prune: prune(kwargs)[:1]
    return tuners
