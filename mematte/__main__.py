"""``python -m mematte`` (what ``torchrun -m mematte train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
