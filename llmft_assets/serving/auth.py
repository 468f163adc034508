"""API-key handling for the model server: where the keys come from and how a request is checked.

Keys have names: the request log records which key (its name, never the key) made each request,
and rate limits are per key. Sources, first match wins:

- `LLMFT_API_KEY`: one key, named `default`;
- the file `LLMFT_API_KEY_FILE` names, in one of three forms:
  a JSON object `{"name": "key", ...}`; lines `name: key` (blank lines and `#` comments skipped);
  or a single line holding just the key (named `default`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path

from llmft_assets import settings

API_KEY_ENV = "LLMFT_API_KEY"
API_KEY_FILE_ENV = "LLMFT_API_KEY_FILE"
DEFAULT_KEY_NAME = "default"
ANONYMOUS_KEY_NAME = "anonymous"  # logged when the server runs without keys (loopback only)
_NAMED_LINE = re.compile(r"^([A-Za-z0-9_.@-]{1,64})\s*:\s*(\S+)$")


class ApiKeyConfigError(RuntimeError):
    """The key configuration is unusable (unreadable or empty key file, public bind without a key)."""


def parse_key_file(text: str, source: str = "the key file") -> dict[str, str]:
    """name -> key from a key file's text (see the module docstring for the forms)."""
    stripped = text.strip()
    if not stripped:
        raise ApiKeyConfigError(f"{source} is empty")
    if stripped.startswith("{"):
        try:
            loaded = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ApiKeyConfigError(f"{source} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip() for k, v in loaded.items()
        ):
            raise ApiKeyConfigError(f"{source} must be a JSON object of non-empty name: key strings")
        keys = {name.strip(): key.strip() for name, key in loaded.items()}
    else:
        lines = [line.strip() for line in stripped.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        if len(lines) == 1 and not _NAMED_LINE.match(lines[0]):
            return {DEFAULT_KEY_NAME: lines[0]}
        keys = {}
        for number, line in enumerate(lines, start=1):
            match = _NAMED_LINE.match(line)
            if match is None:
                # The line is not quoted back: it may be a key.
                raise ApiKeyConfigError(f"{source}: entry {number} is not of the form 'name: key'")
            name, key = match.groups()
            if name in keys:
                raise ApiKeyConfigError(f"{source}: the name {name!r} appears twice")
            keys[name] = key
    if len(set(keys.values())) != len(keys):
        raise ApiKeyConfigError(f"{source}: two names share the same key")
    return keys


def load_api_keys(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """name -> key from LLMFT_API_KEY or LLMFT_API_KEY_FILE; None when neither is set.

    None is only allowed on a loopback address. A named but empty or unreadable file is an error
    rather than silently running without a key.
    """
    env = settings.get(environ)
    key = env.api_key.get_secret_value().strip() if env.api_key is not None else ""
    if key:
        return {DEFAULT_KEY_NAME: key}
    key_file = (env.api_key_file or "").strip()
    if not key_file:
        return None
    try:
        text = Path(key_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyConfigError(
            f"{API_KEY_FILE_ENV} names {key_file!r}, which cannot be read: {exc.strerror}"
        ) from None
    if not text.strip():
        raise ApiKeyConfigError(f"{API_KEY_FILE_ENV} names {key_file!r}, which is empty")
    return parse_key_file(text, f"{API_KEY_FILE_ENV} ({key_file!r})")


def load_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """One configured key (the first), or None when no key is configured."""
    keys = load_api_keys(environ)
    return next(iter(keys.values())) if keys else None


def key_name_for(authorization_header: str | None, keys: Mapping[str, str] | None) -> str | None:
    """The name of the key in 'Bearer <key>', `anonymous` when no keys are configured, else None.

    Every key is compared (constant time each), so timing does not tell which names exist.
    """
    if not keys:
        return ANONYMOUS_KEY_NAME
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    presented = token.strip().encode()
    found: str | None = None
    for name, key in keys.items():
        if hmac.compare_digest(presented, key.encode()) and found is None:
            found = name
    return found


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
