import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small synthetic set in the lab layout: 48 train and 16 test images at 32 px."""
    import synthetic

    root = tmp_path_factory.mktemp("tiny_demo")
    return synthetic.generate_demo(root / "demo", n_train=48, n_test=16, size=32, seed=0, quiet=True)
