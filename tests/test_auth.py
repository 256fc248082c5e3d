"""Token verification: pinned algorithm, claims, and the verified-token cache."""

from __future__ import annotations

import time

import jwt
import pytest

from server import auth
from server.auth import AuthError, TokenVerifier
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
