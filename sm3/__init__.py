"""SM3-II, the memory-efficient adaptive optimizer, for PyTorch."""

from sm3.memory import optimizer_state_bytes
from sm3.optimizer import SM3

__all__ = ["SM3", "optimizer_state_bytes"]
__version__ = "0.1.0"
