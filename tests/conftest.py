import os
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


@pytest.fixture(scope="session")
def mnist_checkpoint(tmp_path_factory) -> Path:
    """best.pt of a small model trained on real MNIST for two epochs, for tests that need
    a model that reads handwriting. Users' clones have no MNIST, so these tests are skipped
    unless MNIST_DIR names a folder holding MNIST/raw; CI sets it."""
    data_dir = os.environ.get("MNIST_DIR")
    if not data_dir or not (Path(data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("needs real MNIST: set MNIST_DIR to a folder holding MNIST/raw")
    import train

    runs = tmp_path_factory.mktemp("mnist_runs")
    argv = [
        "--data-dir",
        data_dir,
        "--image-widths",
        "8,16,32",
        "--embed-dim",
        "32",
        "--epochs",
        "2",
        "--runs-dir",
        str(runs),
    ]
    return train.main(argv)["run_dir"] / "best.pt"


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """best.pt of a small model trained for a few seconds on the offline digits."""
    import train

    runs = tmp_path_factory.mktemp("digits_runs")
    argv = [
        "--dataset",
        "digits",
        "--image-widths",
        "8,16",
        "--embed-dim",
        "16",
        "--batch-size",
        "128",
        "--epochs",
        "3",
        "--runs-dir",
        str(runs),
    ]
    return train.main(argv)["run_dir"] / "best.pt"
