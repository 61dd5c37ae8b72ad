"""pytest collects README.md through Sybil: its shell and Python blocks run in order on small
generated data (tests/readme.py); the tests' own fixtures are in tests/conftest.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))

from readme import readme  # noqa: E402

pytest_collect_file = readme.pytest()
