import sys
from pathlib import Path

import pytest

# The scripts live at the top level of the repository, as users run them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"
