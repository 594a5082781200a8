"""SM3-II, the memory-efficient adaptive optimizer, for PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from sm3.memory import optimizer_state_bytes
from sm3.optimizer import SM3

__all__ = ["SM3", "optimizer_state_bytes"]
try:
    __version__ = version("sm3")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"
