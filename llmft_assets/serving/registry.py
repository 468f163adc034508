"""Serve the MLflow registry's adapters by alias: routing, canary share, live alias moves, release CLI.

One server loads the base model once and the registered adapter versions as LoRA adapters next to
it. Clients choose with the OpenAI `model` field:

    llmft-chat              the `champion` alias (a canary share of it goes to `candidate`)
    llmft-chat@champion     always the champion
    llmft-chat@candidate    the candidate
    llmft-chat@7            version 7, pinned (loaded on first use)

`RegistryWatcher` polls the registry every few seconds: when an alias moves (promotion,
rollback) the new version is downloaded and loaded first, then the alias is switched, so new
requests go to it within seconds, without a restart, and requests already running finish on the
version they started with. The canary share is the registered model's tag `llmft.canary_share`
(a number in [0, 1]), so it also changes without a restart.

The release commands (README "Canary and rollback"):

    python -m llmft_assets.serving.registry promote 7        # champion -> 7; the old one becomes `previous`
    python -m llmft_assets.serving.registry canary 0.1       # 10 % of llmft-chat traffic to the candidate
    python -m llmft_assets.serving.registry rollback         # champion <- `previous`
    python -m llmft_assets.serving.registry status

mlflow is imported inside functions (through llmft_assets.training.tracking).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("bentoml.llmft.serving")

CHAMPION, CANDIDATE, PREVIOUS = "champion", "candidate", "previous"
SERVED_ALIASES = (CHAMPION, CANDIDATE)
CANARY_TAG = "llmft.canary_share"
DEFAULT_REGISTERED_MODEL = "llmft-adapter"
_VERSION = re.compile(r"^[0-9]{1,9}$")


class UnknownModel(LookupError):
    """The requested model id names no alias or version this server can serve."""


@dataclass
class Route:
    model: str  # the id the client asked for
    version: str  # the registry version that answers

    @property
    def adapter(self) -> str:
        return adapter_name(self.version)


def adapter_name(version: str) -> str:
    return f"v{version}"


@dataclass
class ModelRouter:
    """Which adapter version answers a requested model id (thread-safe, no I/O)."""

    served_name: str
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version
    loaded: set[str] = field(default_factory=set)  # versions with an adapter in the engine
    canary_share: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, aliases: Mapping[str, str], canary_share: float | None = None) -> None:
        with self._lock:
            self.aliases = dict(aliases)
            if canary_share is not None:
                self.canary_share = min(1.0, max(0.0, canary_share))

    def mark_loaded(self, version: str) -> None:
        with self._lock:
            self.loaded.add(version)

    def parse(self, model: str) -> tuple[str | None, str | None]:
        """(alias, version) named by a model id; (None, None) for the plain served name."""
        if model == self.served_name:
            return None, None
        prefix = self.served_name + "@"
        if not model.startswith(prefix):
            raise UnknownModel(model)
        suffix = model[len(prefix) :]
        if suffix in SERVED_ALIASES:
            return suffix, None
        if _VERSION.match(suffix):
            return None, suffix
        raise UnknownModel(model)

    def resolve(self, model: str) -> Route:
        """The version answering `model` now; a pinned version may still need loading."""
        alias, version = self.parse(model)
        with self._lock:
            if version is not None:
                return Route(model, version)
            if alias is None:
                alias = CHAMPION
                candidate = self.aliases.get(CANDIDATE)
                if candidate and self.canary_share > 0 and self.rng.random() < self.canary_share:
                    alias = CANDIDATE
            chosen = self.aliases.get(alias)
            if chosen is None:
                raise UnknownModel(model)
            return Route(model, chosen)

    def model_ids(self) -> list[dict[str, Any]]:
        """/v1/models entries (with the version each id answers with now)."""
        with self._lock:
            entries: list[dict[str, Any]] = []
            if CHAMPION in self.aliases:
                entries.append({"id": self.served_name, "version": self.aliases[CHAMPION]})
            for alias in SERVED_ALIASES:
                if alias in self.aliases:
                    entries.append({"id": f"{self.served_name}@{alias}", "version": self.aliases[alias]})
            for version in sorted(self.loaded, key=int):
                entries.append({"id": f"{self.served_name}@{version}", "version": version})
            return entries


@dataclass
class RegistryWatcher:
    """Keeps the router and the engine's adapters in step with the registry's aliases."""

    router: ModelRouter
    registered_model: str
    tracking_uri: str | None
    download_root: Path
    load_adapter: Callable[[str, Path], None]  # engine.load_adapter(name, directory)
    default_canary_share: float = 0.0
    poll_interval_s: float = 2.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _load_lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    polls: int = 0
    poll_failures: int = 0

    def ensure_loaded(self, version: str) -> None:
        """Download and load one version's adapter (no-op when loaded); raises UnknownModel if absent."""
        if version in self.router.loaded:
            return
        from mlflow.exceptions import MlflowException

        from llmft_assets.training import tracking

        with self._load_lock:
            if version in self.router.loaded:
                return
            target = self.download_root / self.registered_model / version
            try:
                adapter_dir = tracking.download_model_version(
                    self.registered_model, version, target, tracking_uri=self.tracking_uri
                )
            except MlflowException as error:
                if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}:
                    raise UnknownModel(version) from None
                raise
            self.load_adapter(adapter_name(version), _adapter_folder(adapter_dir))
            self.router.mark_loaded(version)
            logger.info("loaded adapter %s version %s", self.registered_model, version)

    def sync(self) -> dict[str, str]:
        """One poll: load what the aliases point at, then switch the router to them."""
        from llmft_assets.training import tracking

        aliases: dict[str, str] = {}
        for alias in SERVED_ALIASES:
            version = tracking.get_version_by_alias(
                self.registered_model, alias, tracking_uri=self.tracking_uri
            )
            if version is not None:
                aliases[alias] = str(version.version)
        for version in dict.fromkeys(aliases.values()):
            self.ensure_loaded(version)  # before the switch: no request waits for a download
        self.router.update(aliases, self._canary_share())
        self.polls += 1
        return aliases

    def _canary_share(self) -> float:
        from llmft_assets.training import tracking

        try:
            tags = tracking.make_client(self.tracking_uri).get_registered_model(self.registered_model).tags
        except Exception:
            return self.default_canary_share
        raw = (tags or {}).get(CANARY_TAG)
        try:
            return float(raw) if raw is not None else self.default_canary_share
        except ValueError:
            logger.warning("registered model tag %s=%r is not a number; ignored", CANARY_TAG, raw)
            return self.default_canary_share

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.poll_interval_s):
                try:
                    self.sync()
                except Exception as error:  # the registry being down must not stop serving
                    self.poll_failures += 1
                    logger.warning(
                        "registry poll failed (%s); serving the last known aliases", type(error).__name__
                    )

        self._thread = threading.Thread(target=run, name="registry-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _adapter_folder(downloaded: Path) -> Path:
    """The folder holding adapter_config.json in what was downloaded (the artifact path may nest it)."""
    if (downloaded / "adapter_config.json").is_file():
        return downloaded
    for config in sorted(downloaded.rglob("adapter_config.json")):
        return config.parent
    raise FileNotFoundError(f"no adapter_config.json under {downloaded}")


# ---------------------------------------------------------------------------------------------
# Release commands
# ---------------------------------------------------------------------------------------------


def promote(model: str, version: str, tracking_uri: str | None = None) -> dict[str, str | None]:
    """champion -> version; the champion it replaces is kept as `previous` (for rollback)."""
    from llmft_assets.training import tracking

    current = tracking.get_version_by_alias(model, CHAMPION, tracking_uri=tracking_uri)
    if current is not None and str(current.version) != str(version):
        tracking.set_alias(model, PREVIOUS, current.version, tracking_uri=tracking_uri)
    tracking.set_alias(model, CHAMPION, version, tracking_uri=tracking_uri)
    return status(model, tracking_uri)


def rollback(model: str, tracking_uri: str | None = None) -> dict[str, str | None]:
    """champion <- previous (and previous <- the rolled-back champion, so rollback toggles)."""
    from llmft_assets.training import tracking

    previous = tracking.get_version_by_alias(model, PREVIOUS, tracking_uri=tracking_uri)
    if previous is None:
        raise SystemExit(f"{model} has no '{PREVIOUS}' alias to roll back to")
    return promote(model, str(previous.version), tracking_uri)


def set_canary(model: str, share: float, tracking_uri: str | None = None) -> dict[str, str | None]:
    from llmft_assets.training import tracking

    if not 0.0 <= share <= 1.0:
        raise SystemExit(f"the canary share must be within [0, 1], got {share}")
    tracking.make_client(tracking_uri).set_registered_model_tag(model, CANARY_TAG, str(share))
    return status(model, tracking_uri)


def status(model: str, tracking_uri: str | None = None) -> dict[str, str | None]:
    from llmft_assets.training import tracking

    found: dict[str, str | None] = {}
    for alias in (CHAMPION, CANDIDATE, PREVIOUS):
        version = tracking.get_version_by_alias(model, alias, tracking_uri=tracking_uri)
        found[alias] = None if version is None else str(version.version)
    tags = tracking.make_client(tracking_uri).get_registered_model(model).tags or {}
    found["canary_share"] = tags.get(CANARY_TAG, "0")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmft_assets.serving.registry",
        description="Canary and rollback of the served adapters (MLflow registry aliases).",
    )
    parser.add_argument("--model", default=DEFAULT_REGISTERED_MODEL, help="registered model name")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI / the local store")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("promote", help="make a version the champion").add_argument("version")
    commands.add_parser("rollback", help="make the previous champion the champion again")
    commands.add_parser("canary", help="share of llmft-chat traffic for the candidate").add_argument(
        "share", type=float
    )
    commands.add_parser("status", help="aliases and canary share")
    args = parser.parse_args(argv)
    if args.command == "promote":
        result = promote(args.model, args.version, args.tracking_uri)
    elif args.command == "rollback":
        result = rollback(args.model, args.tracking_uri)
    elif args.command == "canary":
        result = set_canary(args.model, args.share, args.tracking_uri)
    else:
        result = status(args.model, args.tracking_uri)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
