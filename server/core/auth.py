"""User-token verification as a pure object, and the constant-time producer key check.

The verifier pins one algorithm (HS256 with a secret, RS256/ES256 with a public key), so
`alg: none` and algorithm-confusion tokens are refused by pyjwt before any claim is read.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

MAX_USER_ID = 2**63 - 1
VERIFIED_CACHE_SIZE = 10_000
TIME_CLAIMS = ("exp", "nbf", "iat")
# 9999-12-31T23:59:59Z: the last instant an ISO-8601 timestamp (and `refreshed`'s
# `expires_at`) can show; a later `exp` means "never" and is held to this.
LATEST_EXP = 253402300799.0


class AuthError(Exception):
    """Why a token was refused: `reason` is one of missing, invalid, expired."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"token {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Identity:
    user_id: int
    is_admin: bool = False
    expires_at: float | None = None  # epoch seconds, from `exp`


def parse_user_id(raw: object) -> int | None:
    """A user id is a string of digits (or an int) fitting SQLite's INTEGER; else None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 19:
        value = int(raw)
    else:
        return None
    return value if 0 <= value <= MAX_USER_ID else None


class TokenVerifier:
    def __init__(self, key: str | bytes, algorithm: str, leeway: float = 30.0) -> None:
        self._key = key
        self.algorithm = algorithm
        self.leeway = leeway
        self._verified: OrderedDict[str, Identity] = OrderedDict()

    @classmethod
    def for_secret(cls, secret: str, leeway: float = 30.0) -> TokenVerifier:
        return cls(secret, "HS256", leeway)

    @classmethod
    def for_public_key(cls, pem: bytes, leeway: float = 30.0) -> TokenVerifier:
        key = load_pem_public_key(pem)
        if isinstance(key, rsa.RSAPublicKey):
            return cls(pem, "RS256", leeway)
        if isinstance(key, ec.EllipticCurvePublicKey):
            return cls(pem, "ES256", leeway)
        raise ValueError("public key must be RSA (RS256) or EC P-256 (ES256)")

    def verify(self, token: str | None) -> Identity:
        """The identity a token proves. Verified tokens are remembered (bounded LRU), so a
        reconnect storm of clients presenting the tokens they had does not pay pyjwt's
        decode again; expiry is still checked on every use."""
        if not token:
            raise AuthError("missing")
        if len(token) > 8192:
            raise AuthError("invalid", "too long")
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at is not None and time.time() > known.expires_at + self.leeway:
                del self._verified[token]
                raise AuthError("expired")
            self._verified.move_to_end(token)
            return known
        identity = self._decode(token)
        self._verified[token] = identity
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    def _decode(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                leeway=self.leeway,
                options={"require": ["sub"], "verify_sub": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid", type(exc).__name__) from None
        user_id = parse_user_id(claims.get("sub"))
        if user_id is None:
            raise AuthError("invalid", "sub is not a user id")
        return Identity(
            user_id=user_id,
            is_admin=claims.get("role") == "admin",
            expires_at=_expiry(claims),
        )

    def issue(self, user_id: int, ttl: float = 3600.0, *, admin: bool = False) -> str:
        """Sign a token; only possible with a secret (demo mode, `run.py token`)."""
        if self.algorithm != "HS256":
            raise ValueError("tokens can only be issued with an HS256 secret")
        claims: dict[str, object] = {"sub": str(user_id), "iat": int(time.time())}
        claims["exp"] = int(time.time() + ttl)
        if admin:
            claims["role"] = "admin"
        return jwt.encode(claims, self._key, algorithm="HS256")


def _expiry(claims: dict[str, object]) -> float | None:
    """`exp` as epoch seconds, after one rule for every time claim: it is a JSON number.

    pyjwt takes `"exp": "1700000000"` (it calls int() on it) while RFC 7519 says a
    NumericDate is a number; such a token would be accepted once and then never expire
    here, so a time claim of any other type refuses the token, wherever it is presented
    (REST, connect, refresh). An `exp` past year 9999 is held to LATEST_EXP."""
    for name in TIME_CLAIMS:
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise AuthError("invalid", f"{name} is not a number")
    exp = claims.get("exp")
    if exp is None:
        return None
    assert isinstance(exp, int | float)
    return float(min(exp, LATEST_EXP))  # min first: float() of a huge int overflows


def api_key_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so the key cannot be guessed byte by byte from timing."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
