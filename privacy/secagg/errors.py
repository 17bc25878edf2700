"""Errors of Restwise secure aggregation.

The tree (messages never quote key material, shares or update values)::

    SecAggError                     anything the protocol refuses
    ├── SecAggConfigError           a parameter set is invalid or unsafe (also a ValueError)
    ├── InputRefusedError           the device refuses to mask its own update (NaN/inf,
    │                               outside the declared range, wrong length)
    ├── ShareError                  a Shamir share or encrypted share is malformed,
    │   └── ShareAuthenticationError    ...or fails authentication (tampered, truncated,
    │                                   replayed under another sender/receiver/round)
    └── ProtocolViolationError      a message is out of order, duplicated or inconsistent

Server-side faults never propagate as exceptions out of ``secure_sum``: the client is
excluded and the reason reported in ``SecureSumResult.excluded``; a round that cannot be
completed safely is returned with ``aborted=True`` and ``reason``.
"""

from __future__ import annotations

from restwise.privacy.errors import PrivacyError


class SecAggError(PrivacyError):
    """Base class (under ``PrivacyError``, see restwise.common.errors); ``context`` holds
    non-secret details (stage, client index, counts)."""

    def __init__(self, message: str, **context: object):
        super().__init__(message, **context)


class SecAggConfigError(SecAggError, ValueError):
    pass


class InputRefusedError(SecAggError):
    """The device refuses to contribute; ``code`` is a short machine-readable reason."""

    def __init__(self, message: str, code: str, **context: object):
        super().__init__(message, code=code, **context)


class ShareError(SecAggError):
    pass


class ShareAuthenticationError(ShareError):
    pass


class ProtocolViolationError(SecAggError):
    pass
