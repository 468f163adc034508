"""A CheckpointStore over llmft storage (local folder or S3), so a re-launched pod resumes.

Each checkpoint is its own published artifact (`<prefix>/checkpoint-<step>/<version>/` + manifest +
pointer), so a checkpoint counts only once its upload completed; a writer killed mid-upload leaves
nothing `latest()` would pick.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmft_assets.storage import StorageBackend, fetch_artifact, publish_directory
from llmft_assets.storage.publish import MANIFEST_NAME

_CHECKPOINT_KEY = re.compile(r"/checkpoint-(\d+)/([^/]+)/" + re.escape(MANIFEST_NAME) + "$")


class StorageCheckpointStore:
    def __init__(self, backend: StorageBackend, prefix: str, cache_root: Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.backend = backend
        self.prefix = prefix.strip("/")
        self.cache_root = Path(cache_root)
        self.keep_last = keep_last

    def _published(self) -> dict[int, str]:
        """Step -> the version whose manifest is written (a checkpoint counts from its manifest on)."""
        found: dict[int, str] = {}
        for key in self.backend.iter_keys(self.prefix + "/"):
            if match := _CHECKPOINT_KEY.search("/" + key):
                found[int(match.group(1))] = match.group(2)
        return found

    def steps(self) -> list[int]:
        return sorted(self._published())

    def latest(self) -> Path | None:
        published = self._published()
        if not published:
            return None
        step = max(published)
        # By the manifest's own version, not the LATEST pointer: a run killed between writing the manifest
        # and the pointer leaves a complete checkpoint that the pointer does not name yet.
        _, local = fetch_artifact(
            self.backend, f"{self.prefix}/checkpoint-{step}", self.cache_root, version=published[step]
        )
        # The Trainer and the step parser read the step from the folder name: hand back `checkpoint-<step>`.
        named = self.cache_root / "resume" / self.prefix / f"checkpoint-{step}"
        named.parent.mkdir(parents=True, exist_ok=True)
        if named.is_symlink() or named.exists():
            named.unlink()
        named.symlink_to(local.resolve(), target_is_directory=True)
        return named

    def save(self, step: int, local_checkpoint_dir: Path) -> str:
        published = publish_directory(
            self.backend, f"{self.prefix}/checkpoint-{int(step)}", local_checkpoint_dir
        )
        for old in self.steps()[: -self.keep_last]:
            keys = self.backend.list(f"{self.prefix}/checkpoint-{old}/")
            # Manifest first: the checkpoint stops counting before any of its files disappear.
            for key in sorted(keys, key=lambda k: not k.endswith(MANIFEST_NAME)):
                self.backend.delete(key)
        return published.uri
