import sys
from pathlib import Path

import pytest
import torch

# The scripts live at the top level of the repository, as users run them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The test models are tiny: more CPU threads only add synchronisation, and on a busy shared
# machine their spin-waiting made the suite several times slower.
torch.set_num_threads(1)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"
