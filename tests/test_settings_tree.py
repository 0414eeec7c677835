"""The one settings tree: nested ``KB_<SECTION>__FIELD`` variables, the renamed
variables (working, with a warning, for one release), one ``token_storage``, one token
hash and one ``HOST:PORT`` parser."""

from __future__ import annotations

import pytest

from bridge.addresses import host_port, parse_host_port
from bridge.http.settings import HttpSettings, parse_listen
from bridge.http.tokens import token_hash
from bridge.passwords import token_sha256
from bridge.security.settings import SecuritySettings
from bridge.settings import RENAMED_VARIABLES, Settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's shell must not decide these tests: drop every name they look at.
    for old, new, _ in RENAMED_VARIABLES:
        monkeypatch.delenv(old, raising=False)
        monkeypatch.delenv(new, raising=False)


def test_sections_come_from_nested_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP__AUTH_FAIL_BURST", "7")
    monkeypatch.setenv("KB_HTTP__LISTEN", "[::1]:8080")
    monkeypatch.setenv("KB_SECURITY__PROOF_REQUIRED_RETRY_S", "9")
    settings = Settings()
    assert settings.http.auth_fail_burst == 7
    assert settings.http.listen_address == ("::1", 8080)
    assert settings.security.proof_required_retry_s == 9
    assert settings.renamed_in_use == ()


def test_sections_read_no_environment_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP__API_KEYS", "from-env")
    monkeypatch.setenv("KB_SECURITY__TLS_CA", "/from/env")
    assert HttpSettings().api_keys == ""
    assert SecuritySettings().tls_ca is None
    with pytest.raises(ValueError, match="frozen"):
        Settings().http.api_keys = "x"  # type: ignore[misc]


def test_a_flag_beats_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP__LISTEN", "127.0.0.1:1")
    monkeypatch.setenv("KB_HTTP__RATE_BURST", "3")
    settings = Settings(http={"listen": "127.0.0.1:2"})  # type: ignore[arg-type]
    assert settings.http.listen_address == ("127.0.0.1", 2)
    assert settings.http.rate_burst == 3  # the rest of the section still from the env


@pytest.mark.parametrize(
    ("old", "new", "value", "section", "field", "expected"),
    [
        ("KB_API_KEYS", "KB_HTTP__API_KEYS", "k1,k2", "http", "api_keys", "k1,k2"),
        ("KB_HTTP_AUTH_FAIL_BURST", "KB_HTTP__AUTH_FAIL_BURST", "7", "http", "auth_fail_burst", 7),
        (
            "KB_HTTP_TRUSTED_PROXIES",
            "KB_HTTP__TRUSTED_PROXIES",
            "10.0.0.0/8",
            "http",
            "trusted_proxies",
            "10.0.0.0/8",
        ),
        (
            "KB_CLAIM_USERNAME",
            "KB_SECURITY__CLAIM_USERNAME",
            "_c",
            "security",
            "claim_username",
            "_c",
        ),
        (
            "KB_PROOF_REQUIRED_RETRY_S",
            "KB_SECURITY__PROOF_REQUIRED_RETRY_S",
            "9",
            "security",
            "proof_required_retry_s",
            9,
        ),
        (
            "KB_PREVIOUS_TOKEN_PROOF_S",
            "KB_SECURITY__PREVIOUS_TOKEN_PROOF_S",
            "60",
            "security",
            "previous_token_proof_s",
            60.0,
        ),
        ("KB_TLS_CA", "KB_SECURITY__TLS_CA", "/ca.pem", "security", "tls_ca", "/ca.pem"),
        (
            "KB_ROTATION_DEADLINE_S",
            "KB_SECURITY__ROTATION_DEADLINE_S",
            "120",
            "security",
            "rotation_deadline_s",
            120.0,
        ),
    ],
)
def test_a_renamed_variable_still_works_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    old: str,
    new: str,
    value: str,
    section: str,
    field: str,
    expected: object,
) -> None:
    monkeypatch.setenv(old, value)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: use {new}"):
        settings = Settings()
    assert getattr(getattr(settings, section), field) == expected
    assert settings.renamed_in_use == (f"{old} -> {new}",)


def test_the_renamed_registration_secret_stays_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP_REGISTRATION_SECRET", "s3cret")
    with pytest.warns(DeprecationWarning, match="use KB_HTTP__REGISTRATION_SECRET"):
        secret = Settings().http.registration_secret
    assert secret is not None and secret.get_secret_value() == "s3cret"


def test_the_new_name_wins_over_the_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP_AUTH_FAIL_BURST", "7")
    monkeypatch.setenv("KB_HTTP__AUTH_FAIL_BURST", "9")
    with pytest.warns(DeprecationWarning, match="KB_HTTP__AUTH_FAIL_BURST is set and wins"):
        settings = Settings()
    assert settings.http.auth_fail_burst == 9


def test_every_section_field_has_its_old_name() -> None:
    covered = {(section, field) for _, _, (section, field) in RENAMED_VARIABLES}
    assert covered == {("http", f) for f in HttpSettings.model_fields} | {
        ("security", f) for f in SecuritySettings.model_fields
    }


# -- one token_storage for remotes.token ------------------------------------------------


def test_token_storage_default_follows_the_http_face() -> None:
    # Each side's default from when they were two settings: sha256 for the MQTT
    # provisioning, plaintext when the HTTP face (whose CMS reads the column) serves.
    assert Settings().security.token_storage == "sha256"
    served = Settings(http=HttpSettings(listen="127.0.0.1:8080"))
    assert served.security.token_storage == "plaintext"
    chosen = Settings(
        http=HttpSettings(listen="127.0.0.1:8080"),
        security=SecuritySettings(token_storage="sha256"),
    )
    assert chosen.security.token_storage == "sha256"
    kept = Settings(security=SecuritySettings(rotation_poll_s=0.1))
    assert (kept.security.token_storage, kept.security.rotation_poll_s) == ("sha256", 0.1)


def test_token_storage_from_the_one_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_SECURITY__TOKEN_STORAGE", "sha256")
    assert Settings(http={"listen": "127.0.0.1:1"}).security.token_storage == "sha256"  # type: ignore[arg-type]


def test_the_old_http_token_storage_decides_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP_TOKEN_STORAGE", "plaintext")
    with pytest.warns(DeprecationWarning, match="use KB_SECURITY__TOKEN_STORAGE"):
        assert Settings().security.token_storage == "plaintext"


def test_the_old_security_token_storage_beats_the_old_http_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KB_TOKEN_STORAGE", "sha256")
    monkeypatch.setenv("KB_HTTP_TOKEN_STORAGE", "plaintext")
    with pytest.warns(DeprecationWarning) as caught:
        settings = Settings(http={"listen": "127.0.0.1:1"})  # type: ignore[arg-type]
    assert settings.security.token_storage == "sha256"
    assert any("KB_HTTP_TOKEN_STORAGE is deprecated and ignored" in str(w.message) for w in caught)


# -- one token hash, one address parser -------------------------------------------------


def test_one_token_hash() -> None:
    assert token_hash is token_sha256
    assert token_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    # A lone surrogate (a JSON "\ud800" in a bearer) hashes to a digest, it does not raise.
    assert len(token_sha256("\ud800")) == 64


def test_one_address_parser() -> None:
    assert parse_host_port("[::1]:1883", option="--listen", example="x") == ("::1", 1883)
    assert Settings(listen="[::1]:1883").listen_address == ("::1", 1883)
    assert Settings(listen="0.0.0.0:1883").listen_address == ("0.0.0.0", 1883)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert host_port("::1", 1883) == "[::1]:1883"
    assert host_port("127.0.0.1", 1883) == "127.0.0.1:1883"
    with pytest.raises(ValueError, match="--listen '1883' must be HOST:PORT"):
        Settings(listen="1883").listen_address  # noqa: B018 - the property raises
