"""Public functional ops. Each op lives in one module with its checks,
registration, fake function, autograd formula and backend entry points."""

from .group_assign import group_assign
from .reference import group_assign_reference, gumbel_noise

__all__ = ["group_assign", "group_assign_reference", "gumbel_noise"]
