"""API-key handling for the model server: where the key comes from and how a request is checked."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from pathlib import Path

from llmft_assets import settings

API_KEY_ENV = "LLMFT_API_KEY"
API_KEY_FILE_ENV = "LLMFT_API_KEY_FILE"


class ApiKeyConfigError(RuntimeError):
    """The key configuration is unusable (unreadable or empty key file, public bind without a key)."""


def load_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The server's API key from LLMFT_API_KEY, or from the file LLMFT_API_KEY_FILE names.

    Returns None when neither is set (only allowed on a loopback address). A named but empty or
    unreadable file is an error rather than silently running without a key.
    """
    env = settings.get(environ)
    key = env.api_key.get_secret_value().strip() if env.api_key is not None else ""
    if key:
        return key
    key_file = (env.api_key_file or "").strip()
    if not key_file:
        return None
    try:
        key = Path(key_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ApiKeyConfigError(
            f"{API_KEY_FILE_ENV} names {key_file!r}, which cannot be read: {exc.strerror}"
        ) from None
    if not key:
        raise ApiKeyConfigError(f"{API_KEY_FILE_ENV} names {key_file!r}, which is empty")
    return key


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_key_for_bind_host(host: str, api_key: str | None) -> None:
    """Refuse to serve on a non-loopback address without an API key."""
    if api_key is None and not is_loopback_host(host):
        raise ApiKeyConfigError(
            f"Refusing to serve on non-loopback address {host!r} without an API key: "
            f"set {API_KEY_ENV} or {API_KEY_FILE_ENV}, or bind to 127.0.0.1."
        )


def bearer_token_matches(authorization_header: str | None, api_key: str | None) -> bool:
    """True when no key is configured, or the header is 'Bearer <key>' (constant-time compare)."""
    if api_key is None:
        return True
    if not authorization_header:
        return False
    scheme, _, token = authorization_header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def serve_cli_bind_host(argv: list[str], environ: Mapping[str, str], default_host: str) -> str | None:
    """The host a `bentoml serve ...` command line will bind, or None when argv is not one.

    Checked in the CLI process so that a public bind without a key stops the command itself,
    instead of a worker failing (and being restarted) behind a running arbiter.
    """
    if len(argv) < 2 or "bentoml" not in argv[0] or argv[1] not in ("serve", "serve-http"):
        return None
    for index, arg in enumerate(argv):
        if arg == "--host" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return environ.get("BENTOML_HOST") or default_host
