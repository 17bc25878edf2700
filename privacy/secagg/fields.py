"""What device and server both need to read and write a secure-aggregation message: typed
field parsing, the layout of an encrypted share, the parameters of an epoch, and the
extra slots (per-device numbers summed inside the masked vector, never sent in the clear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from . import shamir
from .config import SecAggConfig
from .errors import ProtocolViolationError, SecAggConfigError, ShareError

SHARE_KEY_PURPOSE = b"share-enc"
PAIR_MASK_PURPOSE = b"pair-mask"
# An encrypted share's plaintext: sender and receiver index (4 bytes each), then the share of
# the self-mask seed b and the share of the round's mask private key s_sk.
SHARE_HEADER = 8
SHARE_PLAINTEXT = SHARE_HEADER + 2 * shamir.SHARE_BYTES
MAX_CT_BYTES = SHARE_PLAINTEXT + 12 + 16  # nonce + GCM tag
SESSION_CHARS = 32  # a session id: 16 random bytes, hex


def config(content: RecordDict, name: str) -> ConfigRecord | None:
    """The ConfigRecord ``name`` of ``content``, or None (RecordDict.config_records would
    copy every config record of the message on each call)."""
    record = content.get(name)
    return record if isinstance(record, ConfigRecord) else None


def arrays(content: RecordDict, name: str) -> ArrayRecord | None:
    record = content.get(name)
    return record if isinstance(record, ArrayRecord) else None


def int_value(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolViolationError(f"{what} must be an integer")
    return int(value)


def int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolViolationError(f"{what} must be a list of integers")
    return list(value)


def bytes_list(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ProtocolViolationError(f"{what} must be a list of byte strings")
    return list(value)


def float_list(value: object, what: str) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ProtocolViolationError(f"{what} must be a list of finite numbers")
    return [float(v) for v in value]


def distinct(values: list[int], what: str) -> list[int]:
    if len(set(values)) != len(values):
        raise ProtocolViolationError(f"{what} has duplicates")
    return values


def share_plaintext(sender: int, receiver: int, b_share: bytes, sk_share: bytes) -> bytes:
    return sender.to_bytes(4, "big") + receiver.to_bytes(4, "big") + b_share + sk_share


def split_plaintext(plaintext: bytes, sender: int, receiver: int) -> tuple[bytes, bytes]:
    """(b share, sk share) of a decrypted share; raises ShareError for a wrong layout."""
    if (
        len(plaintext) != SHARE_PLAINTEXT
        or plaintext[:4] != sender.to_bytes(4, "big")
        or plaintext[4:8] != receiver.to_bytes(4, "big")
    ):
        raise ShareError("a decrypted share has the wrong layout")
    b_share = plaintext[SHARE_HEADER : SHARE_HEADER + shamir.SHARE_BYTES]
    sk_share = plaintext[SHARE_HEADER + shamir.SHARE_BYTES :]
    shamir.parse_share(b_share)
    shamir.parse_share(sk_share)
    return b_share, sk_share


# -- the epoch's parameters, as the server sends them and the device re-validates them -----------
EPOCH_FIELDS = ("num_neighbours", "threshold", "max_dropout_fraction", "frac_bits", "ring_bits", "max_cohort",
                "out_of_range")


def epoch_fields(config: SecAggConfig) -> dict:
    return {
        "num_neighbours": config.num_neighbours, "threshold": config.threshold,
        "max_dropout_fraction": float(config.max_dropout_fraction), "frac_bits": config.frac_bits,
        "ring_bits": config.ring_bits, "max_cohort": config.max_cohort, "out_of_range": config.out_of_range,
    }


def config_from_fields(msg: ConfigRecord) -> SecAggConfig:
    """The epoch's SecAggConfig from a setup or join message; refuses unsafe parameters
    (SecAggConfigError) and malformed ones (ProtocolViolationError)."""
    try:
        threshold = msg["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError("threshold")
        return SecAggConfig(
            num_neighbours=int_value(msg["num_neighbours"], "num_neighbours"), threshold=threshold,
            max_dropout_fraction=float(msg["max_dropout_fraction"]), frac_bits=int_value(msg["frac_bits"], "frac_bits"),
            ring_bits=int_value(msg["ring_bits"], "ring_bits"), max_cohort=int_value(msg["max_cohort"], "max_cohort"),
            out_of_range=str(msg["out_of_range"]),
        )
    except KeyError as exc:
        raise ProtocolViolationError("the message lacks an epoch parameter") from exc
    except SecAggConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolViolationError("the message has a malformed epoch parameter") from exc


# -- extra slots --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extra:
    """A per-device number summed inside the masked vector: two slots after the update, the
    value clipped into [lo, hi] and mapped onto [0, clip_range], and a presence flag
    (clip_range when the device had a finite value, else 0). The server decodes the sum and
    the count of the survivors' values; no device's own value leaves it unmasked."""

    name: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not self.name or not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise SecAggConfigError(f"extra {self.name!r} needs a name and a finite range lo < hi")


def extras_of(config: SecAggConfig) -> tuple[Extra, ...]:
    lo, hi = config.metric_range
    return tuple(Extra(name, float(lo), float(hi)) for name in config.metric_keys)


def extra_slots(extras: tuple[Extra, ...], values: dict[str, float], clip_range: float) -> np.ndarray:
    out = np.zeros(2 * len(extras))
    for i, extra in enumerate(extras):
        value = values.get(extra.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            clipped = min(max(float(value), extra.lo), extra.hi)
            out[2 * i] = (clipped - extra.lo) / (extra.hi - extra.lo) * clip_range
            out[2 * i + 1] = clip_range
    return out


def decode_extras(extras: tuple[Extra, ...], slots: np.ndarray, clip_range: float) -> dict[str, tuple[float, int]]:
    """name -> (sum of the survivors' values, how many had one)."""
    out = {}
    for i, extra in enumerate(extras):
        count = int(round(float(slots[2 * i + 1]) / clip_range))
        total = float(slots[2 * i]) / clip_range * (extra.hi - extra.lo) + count * extra.lo
        out[extra.name] = (total, count)
    return out
