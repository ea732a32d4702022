"""[dashboard] in manager.toml: off by default, HTTPS only, certificate from [tls] unless its own is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmha.manager.settings import DEFAULT_DASHBOARD_TOKENS, SettingsError, load


def test_off_by_default(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, '[manager]\nid = "m"\n'), {}, {})
    assert settings.dashboard_listen == "" and settings.dashboard_tokens == DEFAULT_DASHBOARD_TOKENS


def test_own_certificate_or_the_tls_one(tmp_path: Path) -> None:
    own = load(_write(tmp_path, '[dashboard]\nlisten = "127.0.0.1:8443"\ncert = "/c"\nkey = "/k"\n'), {}, {})
    assert (own.dashboard_listen, own.dashboard_cert, own.dashboard_key) == ("127.0.0.1:8443", "/c", "/k")
    shared = load(_write(tmp_path, '[tls]\ncert = "/t.crt"\nkey = "/t.key"\nca = "/ca.crt"\n'
                                   '[dashboard]\nlisten = "127.0.0.1:1"\ntokens = "/x.json"\n'), {}, {})
    assert (shared.dashboard_cert, shared.dashboard_key, shared.dashboard_tokens) == ("/t.crt", "/t.key", "/x.json")


@pytest.mark.parametrize(("text", "message"), [
    ('[dashboard]\nlisten = "127.0.0.1:8443"\n', "HTTPS only"),
    ('[dashboard]\nlisten = "nowhere"\ncert = "/c"\nkey = "/k"\n', "HOST:PORT"),
    ('[dashboard]\nport = 1\n', "unknown keys in \\[dashboard\\]"),
])
def test_bad_dashboard_settings_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load(_write(tmp_path, text), {}, {})


def _write(tmp_path: Path, text: str) -> Path:
    """manager.toml with `text`; without [tls] it runs plaintext (explicitly: mutual TLS is the default)."""
    path = tmp_path / "manager.toml"
    if "[tls]" not in text:
        plaintext = "[manager]\nallow_insecure_plaintext = true\n"
        text = text.replace("[manager]\n", plaintext) if "[manager]\n" in text else plaintext + text
    path.write_text(text)
    return path
