"""The package's layout: imports flow one way (no cycles)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "import_cycles.py"


@pytest.mark.skipif(not TOOL.exists(), reason="../shared/tools/import_cycles.py is not here")
def test_imports_flow_one_way():
    result = subprocess.run([sys.executable, str(TOOL), "ddrs"], cwd=REPO, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 cycles" in result.stdout
