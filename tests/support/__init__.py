"""What the tests share, so that no test file imports another: tiny configs and the Hypothesis
strategy over model geometries (configs), the model properties every path is held to
(properties), data sets written in their real on-disk formats (datasets), checkpoints to sample
from (checkpoints), training-run helpers (runs), calibrated models (calibration) and the CLI
runner (cli). tests/conftest.py puts tests/ on sys.path, so each is `from support.X import ...`."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository's root: configs/, benchmarks/, imagetx/
