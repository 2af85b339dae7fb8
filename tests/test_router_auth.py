"""Bearer-token auth: token -> tenant, and the tenant's server-side salt."""

from __future__ import annotations

import json

import pytest

from router.auth import ENV_VAR, AuthConfigError, AuthError, TokenAuth, tenant_salt


def test_from_env_value_and_authenticate():
    auth = TokenAuth.from_env_value("tok1=tenantA, tok2=tenantB,")
    assert auth.tokens == {"tok1": "tenantA", "tok2": "tenantB"}
    assert auth.authenticate([("authorization", "Bearer tok1")]) == "tenantA"
    assert auth.authenticate([("Authorization", b"bearer tok2")]) == "tenantB"


@pytest.mark.parametrize("metadata, message", [
    (None, "missing bearer token"),
    ([("x-other", "1")], "missing bearer token"),
    ([("authorization", "tok1")], "malformed authorization header"),
    ([("authorization", "Basic tok1")], "malformed authorization header"),
    ([("authorization", "Bearer tok3")], "invalid bearer token"),
])
def test_bad_credentials(metadata, message):
    auth = TokenAuth({"tok1": "a"})
    with pytest.raises(AuthError, match=message):
        auth.authenticate(metadata)


def test_file_and_load_precedence(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"t-file": "filetenant"}))
    assert TokenAuth.load(path, env={ENV_VAR: "t-env=envtenant"}).tokens == {"t-file": "filetenant"}
    assert TokenAuth.load(None, env={ENV_VAR: "t-env=envtenant"}).tokens == {"t-env": "envtenant"}
    assert TokenAuth.load(None, env={}) is None


@pytest.mark.parametrize("content, message", [
    ("not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("{}", "no tokens were given"),
    ('{"": "a"}', "must be non-empty"),
])
def test_bad_token_files(tmp_path, content, message):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        TokenAuth.from_file(path)


def test_bad_env_value_and_missing_file(tmp_path):
    with pytest.raises(AuthConfigError, match="token=tenant"):
        TokenAuth.from_env_value("justatoken")
    with pytest.raises(AuthConfigError, match="not found"):
        TokenAuth.from_file(tmp_path / "absent.json")


def test_tenant_salts_cannot_collide():
    assert tenant_salt("a", "") != tenant_salt("b", "")
    assert tenant_salt("a", "x") != tenant_salt("a", "")
    # The delimiter cannot appear in a tenant name, so no client salt can reach another tenant's space.
    with pytest.raises(AuthConfigError):
        TokenAuth({"tok": "a\x1fb"})
