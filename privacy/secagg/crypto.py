"""Cryptographic primitives, all from ``cryptography`` (OpenSSL).

- X25519 key agreement; two kinds of key pair per client: ``c`` (one per epoch: encrypts the
  shares sent to neighbours) and ``s`` (one per round: the pairwise mask seeds). Private keys
  are raw 32-byte values held only in memory (the node's ``context.state``), never logged or
  written to disk.
- HKDF-SHA256 derives every key from a raw X25519 secret, with ``info`` binding the
  purpose, protocol version, session, epoch, round and the (ordered) pair of client indices.
- AES-256-GCM encrypts shares; the associated data binds session, epoch, the round the
  shares are for, sender and receiver, so a share cannot be replayed to another receiver,
  from another sender, into another round or another session.
- Masks are the ChaCha20 keystream under a 256-bit seed (one seed, one stream: the nonce
  is fixed), read as little-endian uint64 words and reduced to the ring Z_{2^bits} by
  masking the top bits (uniform, because the keystream bits are).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ShareAuthenticationError, ShareError

PROTOCOL_TAG = b"restwise-secagg/v2"
KEY_BYTES = 32
NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw
_PUB = serialization.PublicFormat.Raw
_PRIV = serialization.PrivateFormat.Raw


def generate_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys."""
    key = X25519PrivateKey.generate()
    return (
        key.private_bytes(_RAW, _PRIV, serialization.NoEncryption()),
        key.public_key().public_bytes(_RAW, _PUB),
    )


def public_from_private(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _PUB)


def valid_public_key(public: bytes) -> bool:
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        return False
    try:
        X25519PublicKey.from_public_bytes(public)
    except ValueError:
        return False
    return True


def _fields(*values: object) -> bytes:
    return b"|".join([PROTOCOL_TAG, *(v if isinstance(v, bytes) else str(v).encode() for v in values)])


def key_info(purpose: bytes, session: str, epoch: int, round_: int, a: int, b: int) -> bytes:
    """HKDF ``info`` of a pairwise key: purpose, session, epoch, round, the ordered pair."""
    return _fields(purpose, session, epoch, round_, min(a, b), max(a, b))


def private_key(private: bytes) -> X25519PrivateKey:
    """Parse once, agree many times (parsing costs as much as an agreement)."""
    return X25519PrivateKey.from_private_bytes(private)


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared by the owners of ``private`` and ``peer_public``, derived with
    HKDF ``info`` (see :func:`key_info`).

    Raises ShareError for a malformed or low-order peer key (all-zero shared secret)."""
    key = private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
    try:
        raw = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ShareError("a peer public key is invalid") from exc
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info
    ).derive(raw)


def share_aad(session: str, epoch: int, round_: int, sender: int, receiver: int) -> bytes:
    """Associated data of the shares ``sender`` deals to ``receiver`` for round ``round_``."""
    return _fields(b"share", session, epoch, round_, sender, receiver)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + 16:
        raise ShareAuthenticationError("an encrypted share is truncated")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise ShareAuthenticationError("an encrypted share failed authentication") from exc


def commitment(session: str, round_: int, index: int, secret: bytes) -> bytes:
    """Binding, hiding (secret is 256 random bits) commitment to a self-mask seed."""
    return hashlib.sha256(_fields(b"commit", session, round_, index, secret)).digest()


_ZERO_NONCE = bytes(16)


def expand_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^ring_bits} (uint64) from a 256-bit seed."""
    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed must be 32 bytes")
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor().update(
        bytes(8 * length)
    )
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=True)
    if ring_bits < 64:
        words &= np.uint64((1 << ring_bits) - 1)
    return words
