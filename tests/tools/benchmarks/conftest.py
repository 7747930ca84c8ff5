"""The benchmark lab's modules import each other by name, as its scripts run (`python -P
tools/benchmarks/compare.py` puts its own folder on sys.path): the tests put that folder there too,
never the repository root (its kernels/ would shadow Hugging Face's `kernels`)."""

import sys

from tests.helpers import REPOSITORY

LAB = REPOSITORY / "tools" / "benchmarks"

if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))
