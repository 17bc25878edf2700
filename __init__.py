"""Restwise: privacy-first federated learning of personal recovery and overtraining models.

This file is the root of the import package ``restwise``; its subpackages are the top-level
folders ``client/``, ``server/``, ``models/`` and ``privacy/`` (see ``pyproject.toml``).
"""

__version__ = "0.1.0"
