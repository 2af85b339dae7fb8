"""The cluster credential scheme (common/cluster_auth.py), its flags (common/cluster_flags.py) and the
authorization table (cache_service/access.py), without servers: exact keys, tokens, refusals and messages.
The servers that use them are tested in test_trust_identity.py."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cache_service import access
from common.cluster_auth import (
    MAC_KEY,
    MAX_CLOCK_SKEW_S,
    MEMBER_KEY,
    NONCE_KEY,
    TIME_KEY,
    Caller,
    CredentialError,
    Member,
    PermissionDenied,
    SharedSecret,
    TlsFiles,
    Token,
    Unauthenticated,
    auth_context_names,
    peer_names,
)
from common.cluster_flags import CredentialFlags

SECRET = SharedSecret(b"k" * 32)
NOW = 1_700_000_000
METHOD = "/prefixcache.v1.CacheService/RegisterNode"


def test_a_member_key_is_bound_to_its_identity():
    expected = hmac.new(b"k" * 32, b"member:worker-0", hashlib.sha256).digest()
    assert SECRET.key("worker-0") == expected
    assert SECRET.key("worker-1") != expected
    assert SharedSecret(b"j" * 32).key("worker-0") != expected


def test_a_token_verifies_for_its_method_within_the_clock_skew():
    token = SECRET.sign("worker-0", METHOD, now=NOW)
    mac = hmac.new(SECRET.key("worker-0"), f"{METHOD}\n{NOW}".encode(), hashlib.sha256).hexdigest()
    assert token == Token("worker-0", NOW, mac)
    assert token.metadata() == ((MEMBER_KEY, "worker-0"), (TIME_KEY, str(NOW)), (MAC_KEY, mac))
    for skew in (-MAX_CLOCK_SKEW_S, 0, MAX_CLOCK_SKEW_S):
        assert SECRET.verify(token, METHOD, now=NOW + skew) == Caller(frozenset({"worker-0"}))


@pytest.mark.parametrize(("now", "why"), [
    (NOW + 121, "cluster credential of 'worker-0' is 121 s old; at most 120 s of clock skew is accepted"),
    (NOW - 121, "cluster credential of 'worker-0' is 121 s in the future; at most 120 s of clock skew is accepted"),
])
def test_a_token_outside_the_window_is_refused(now, why):
    with pytest.raises(Unauthenticated) as info:
        SECRET.verify(SECRET.sign("worker-0", METHOD, now=NOW), METHOD, now=now)
    assert str(info.value) == why


def test_a_token_replayed_on_another_method_forged_or_of_another_secret_is_refused():
    token = SECRET.sign("worker-0", "/prefixcache.v1.CacheService/Lookup", now=NOW)
    forged = [
        (token, METHOD, SECRET),  # replayed on another method
        (token._replace(identity="worker-1"), "/prefixcache.v1.CacheService/Lookup", SECRET),  # another identity
        (token._replace(issued_s=NOW + 1), "/prefixcache.v1.CacheService/Lookup", SECRET),  # another time
        (token, "/prefixcache.v1.CacheService/Lookup", SharedSecret(b"j" * 32)),  # another cluster
    ]
    for t, method, secret in forged:
        with pytest.raises(Unauthenticated) as info:
            secret.verify(t, method, now=NOW)
        assert str(info.value) == (f"invalid cluster credential for {t.identity!r} (another secret, or a token "
                                   f"made for another call)")


def test_a_call_without_a_token_or_with_a_malformed_one_is_refused():
    member = Member("cache-service", SECRET)
    with pytest.raises(Unauthenticated) as info:
        member.verify(METHOD, [("x-request-id", "r1")])
    assert str(info.value) == ("no cluster credential: only cluster members may call this (send x-pc-member, "
                               "x-pc-time and x-pc-mac)")
    good = dict(SECRET.sign("worker-0", METHOD).metadata())
    for key, bad in ((TIME_KEY, "soon"), (MEMBER_KEY, "bad id"), (MAC_KEY, "XYZ"), (TIME_KEY, "9" * 13)):
        with pytest.raises(Unauthenticated, match=r"^malformed cluster credential$"):
            member.verify(METHOD, list({**good, key: bad}.items()))
    caller, nonce = member.verify(METHOD, list({**good, NONCE_KEY: "ab12"}.items()))
    assert (caller, nonce) == (Caller(frozenset({"worker-0"})), "ab12")


def test_the_raw_streams_token_form_round_trips_and_a_peer_proves_its_key():
    token = SECRET.sign("worker-1", "raw-stream:x", nonce="00ff", now=NOW)
    assert Token.from_bytes(token.to_bytes()) == token
    assert Token.from_bytes(token._replace(nonce="").to_bytes()) == token._replace(nonce="")
    with pytest.raises(Unauthenticated, match=r"^malformed cluster credential \(expected identity, time, mac"):
        Token.from_bytes(b"worker-1\n1")
    proof = SECRET.prove("worker-0", "00ff")
    assert proof == hmac.new(SECRET.key("worker-0"), b"proof\n00ff", hashlib.sha256).hexdigest()
    requester = Member("worker-1", SECRET)
    assert requester.proves("worker-0", "00ff", proof)
    assert not requester.proves("worker-2", "00ff", proof)  # the proof of another node
    assert not requester.proves("worker-0", "00fe", proof)  # an answer to another nonce (a replay)
    assert not requester.proves("worker-0", "00ff", "")


def test_secrets_and_tls_files_load_with_clear_errors(tmp_path):
    with pytest.raises(CredentialError, match=r"^the cluster secret is 15 bytes; at least 16 are needed"):
        SharedSecret(b"x" * 15)
    (tmp_path / "secret").write_text("  " + "ab" * 16 + "\n")
    assert SharedSecret.from_file(tmp_path / "secret") == SharedSecret(b"ab" * 16)
    with pytest.raises(CredentialError, match=r"^cannot read the cluster secret file .*/nope: No such file"):
        SharedSecret.from_file(tmp_path / "nope")
    assert len(SharedSecret.generate().secret) == 32 and SharedSecret.generate() != SharedSecret.generate()
    assert "ab" not in repr(SharedSecret(b"ab" * 16))  # never printed
    files = TlsFiles(f"{tmp_path}/{{id}}.crt", f"{tmp_path}/{{id}}.key", f"{tmp_path}/ca.crt")
    assert files.resolve("worker-3") == TlsFiles(f"{tmp_path}/worker-3.crt", f"{tmp_path}/worker-3.key",
                                                 f"{tmp_path}/ca.crt")
    with pytest.raises(CredentialError, match=r"^cannot read the TLS certificate .*/worker-3.crt: No such file"):
        Member("worker-3", files)
    (tmp_path / "worker-3.crt").write_text("not a certificate")
    with pytest.raises(CredentialError, match=r"^the TLS certificate .*/worker-3.crt is not PEM$"):
        Member("worker-3", files)
    with pytest.raises(CredentialError, match=r"^identity 'a b' is not 1-128 characters"):
        Member("a b", SECRET)


def test_a_certificates_identities_are_its_common_name_and_dns_names():
    cert = {"subject": ((("countryName", "DE"),), (("commonName", "worker-0"),)),
            "subjectAltName": (("DNS", "worker-0"), ("DNS", "node-a"), ("IP Address", "10.0.0.1"))}
    assert peer_names(cert) == frozenset({"worker-0", "node-a"})
    assert auth_context_names({"x509_common_name": [b"router"], "x509_subject_alternative_name": [b"router"],
                               "transport_security_type": [b"ssl"]}) == frozenset({"router"})


def test_the_credential_flags():
    ok = [CredentialFlags(), CredentialFlags(secret_file="s"), CredentialFlags(tls_cert="c", tls_key="k", tls_ca="a")]
    for flags in ok:
        flags.check(front_door=False)
    CredentialFlags(tls_cert="c", tls_key="k").check(front_door=True)  # serve: the router's TLS only
    refused = [
        (CredentialFlags(tls_cert="c"), True, "--tls-cert and --tls-key go together"),
        (CredentialFlags(tls_ca="a"), True, "--tls-ca needs --tls-cert and --tls-key (each member's own certificate)"),
        (CredentialFlags(secret_file="s", tls_cert="c", tls_key="k", tls_ca="a"), True,
         "--cluster-secret-file and --tls-ca are two kinds of cluster credential: give one"),
        (CredentialFlags(tls_cert="c", tls_key="k"), False,
         "--tls-cert and --tls-key need --tls-ca here (mutual TLS between members)"),
    ]
    for flags, front_door, why in refused:
        with pytest.raises(CredentialError) as info:
            flags.check(front_door=front_door)
        assert str(info.value) == why
    assert CredentialFlags(tls_cert="c", tls_key="k", tls_ca="a").credential() == TlsFiles("c", "k", "a")
    assert CredentialFlags().credential(b"s" * 16) == SharedSecret(b"s" * 16)
    assert CredentialFlags().credential() != CredentialFlags().credential()  # a new secret per start
    assert CredentialFlags().front_door() is None


def caller(*names: str) -> Caller:
    return Caller(frozenset(names))


def test_who_may_call_what():
    allowed = [
        lambda: access.check_node(caller("worker-0"), "worker-0", "Heartbeat"),
        lambda: access.check_node(caller("worker-0", "node-a"), "node-a", "Heartbeat"),  # a certificate of two
        lambda: access.check_node(None, "anyone", "Heartbeat"),  # a server without a credential
        lambda: access.check_lookup(caller("worker-1")),
        lambda: access.check_lookup(caller("router")),
        lambda: access.check_router_or_operator(caller("router"), "Pin"),
        lambda: access.check_router_or_operator(caller("operator"), "GetStats"),
        lambda: access.check_fetch(caller("worker-1"), "worker-1"),
        lambda: access.check_fetch(caller("worker-1"), ""),
    ]
    for call in allowed:
        call()
    refused = [
        (lambda: access.check_node(caller("worker-1"), "worker-0", "RegisterNode"),
         "worker-1 may not call RegisterNode for node 'worker-0': a node calls it only for itself"),
        (lambda: access.check_node(caller("router"), "router", "RegisterNode"),
         "router may not call RegisterNode for node 'router': a node calls it only for itself"),
        (lambda: access.check_lookup(caller("operator")), "operator may not call Lookup: nodes and the router may"),
        (lambda: access.check_router_or_operator(caller("worker-0"), "Pin"),
         "worker-0 may not call Pin: the router and operators may"),
        (lambda: access.check_fetch(caller("router"), ""), "router may not fetch blocks: only nodes may"),
        (lambda: access.check_fetch(caller("worker-1"), "worker-0"),
         "worker-1 may not fetch blocks for 'worker-0': only for itself"),
    ]
    for call, why in refused:
        with pytest.raises(PermissionDenied) as info:
            call()
        assert str(info.value) == why and info.value.code == "PERMISSION_DENIED"
    assert access.is_operator(caller("operator")) and not access.is_operator(caller("router"))
