"""Token verification: pinned algorithm, claims, and the verified-token cache."""

from __future__ import annotations

import time

import jwt
import pytest

from server.core import auth
from server.core.auth import AuthError, TokenVerifier
from tests.conftest import SECRET, make_token


def test_cached_token_is_still_checked_for_expiry() -> None:
    verifier = TokenVerifier.for_secret(SECRET, leeway=30)
    token = jwt.encode({"sub": "5", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    assert verifier.verify(token).user_id == 5  # within the leeway: accepted and cached
    verifier.leeway = 0
    with pytest.raises(AuthError) as refused:
        verifier.verify(token)  # answered from the cache, and still refused as expired
    assert refused.value.reason == "expired"


def test_refused_tokens_are_never_cached() -> None:
    verifier = TokenVerifier.for_secret(SECRET)
    forged = make_token(1, secret="another-secret-0123456789abcdefghij")
    for _ in range(2):
        with pytest.raises(AuthError) as refused:
            verifier.verify(forged)
        assert refused.value.reason == "invalid"


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    verifier = TokenVerifier.for_secret(SECRET)
    tokens = [make_token(n) for n in range(1, 6)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._verified) == 3
    assert [verifier.verify(t).user_id for t in tokens] == [1, 2, 3, 4, 5]


def test_admin_role_and_exp_are_read() -> None:
    verifier = TokenVerifier.for_secret(SECRET)
    identity = verifier.verify(make_token(9, admin=True, ttl=100))
    assert identity.is_admin and identity.user_id == 9
    assert identity.expires_at is not None and identity.expires_at > time.time()


# ---- time claims: one rule (a JSON number) wherever a token is presented ----------------


def _token_with(**claims: object) -> str:
    return jwt.encode({"sub": "1", **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("claims", [
    {"exp": str(int(time.time()) + 3600)},  # pyjwt takes it; it would never expire here
    {"exp": str(int(time.time()) - 3600)},
    {"exp": True},
    {"exp": None},
    {"exp": [int(time.time()) + 3600]},
    {"exp": int(time.time()) + 3600, "nbf": str(int(time.time()) - 10)},
    {"exp": int(time.time()) + 3600, "iat": str(int(time.time()) - 10)},
], ids=["exp-future-string", "exp-past-string", "exp-bool", "exp-null", "exp-list",
        "nbf-string", "iat-string"])
def test_time_claims_that_are_not_numbers_are_refused(claims: dict[str, object]) -> None:
    verifier = TokenVerifier.for_secret(SECRET)
    for _ in range(2):  # and never cached
        with pytest.raises(AuthError) as refused:
            verifier.verify(_token_with(**claims))
        # pyjwt reads a past string or `true` (int() is 1) as expired before we see it
        assert refused.value.reason in ("invalid", "expired")


def test_numeric_time_claims_are_accepted() -> None:
    now = time.time()
    verifier = TokenVerifier.for_secret(SECRET)
    identity = verifier.verify(_token_with(exp=now + 100.5, nbf=int(now) - 5, iat=now - 5))
    assert identity.expires_at == pytest.approx(now + 100.5)


@pytest.mark.parametrize("exp", [10**20, 1e300, 10**400])
def test_exp_beyond_year_9999_is_held_to_the_last_second(exp: float) -> None:
    identity = TokenVerifier.for_secret(SECRET).verify(_token_with(exp=exp))
    assert identity.expires_at == auth.LATEST_EXP
