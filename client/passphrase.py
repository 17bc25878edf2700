"""Passphrase strength: a new passphrase must be hard to guess (zxcvbn score >= 3 of 4).

The passphrase is the only thing standing between a copied store folder and its contents
(Argon2id makes each guess cost ~0.15 s, but a common phrase is among the first guesses).
zxcvbn (Dropbox's estimator) scores it from 0 to 4 against dictionaries, keyboard patterns,
dates and repeats; 3 ("safely unguessable: moderate protection from offline slow-hash
scenario") is the least we accept. ``--allow-weak`` lets tests and demos through, saying so.

Its own module because zxcvbn's word lists take ~25 ms to import: only `init` and
`passphrase change` need them.
"""

from __future__ import annotations

from collections.abc import Iterable

from zxcvbn import zxcvbn

from restwise.client.errors import WeakPassphraseError

MIN_SCORE = 3
# zxcvbn refuses longer input; a longer passphrase is at least as strong as its first 72
# characters, so those are scored.
ZXCVBN_MAX_LENGTH = 72


def passphrase_score(passphrase: str, user_inputs: Iterable[str] = ()) -> dict:
    """zxcvbn's score (0-4) and its generic feedback (never the passphrase itself)."""
    result = zxcvbn(passphrase[:ZXCVBN_MAX_LENGTH], user_inputs=[u for u in user_inputs if u])
    feedback = result.get("feedback") or {}
    return {
        "score": int(result["score"]),
        "warning": str(feedback.get("warning") or ""),
        "suggestions": [str(s) for s in feedback.get("suggestions") or []],
    }


def check_passphrase(passphrase: str, *, user_inputs: Iterable[str] = ("restwise",)) -> None:
    """Raise :class:`WeakPassphraseError` (exit 2) below a zxcvbn score of ``MIN_SCORE``."""
    if not passphrase:
        raise WeakPassphraseError("the passphrase must not be empty")
    rating = passphrase_score(passphrase, user_inputs)
    if rating["score"] >= MIN_SCORE:
        return
    parts = [
        f"this passphrase is too easy to guess (strength {rating['score']} of 4; "
        f"at least {MIN_SCORE} is needed)."
    ]
    if rating["warning"]:
        parts.append(rating["warning"].rstrip(".") + ".")
    parts += [s.rstrip(".") + "." for s in rating["suggestions"]]
    parts.append("Four or more unrelated words make a strong one that is easy to remember "
                 "(--allow-weak accepts it anyway, for tests and demos only).")
    raise WeakPassphraseError(" ".join(parts))


__all__ = ["check_passphrase", "passphrase_score", "MIN_SCORE"]
