"""Restwise: privacy-first federated learning of personal recovery and overtraining models.

This file is the root of the import package ``restwise``; its subpackages are the top-level
folders ``common/``, ``models/``, ``privacy/``, ``client/``, ``server/`` and ``simulation/``
(see ``pyproject.toml`` and docs/architecture.md).
"""

__version__ = "0.1.0"
