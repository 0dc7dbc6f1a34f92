"""Errors a user can act on; every one is a ValueError, so the CLI prints it as one line."""
from __future__ import annotations

__all__ = ["UnreachableTargetError"]


class UnreachableTargetError(ValueError):
    """A speedup target cannot be met in the environment (even with every prunable module removed,
    or after the allowed table corrections)."""
