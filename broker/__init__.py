"""broker: a dynamic credentials broker with a Vault-compatible HTTP API."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
