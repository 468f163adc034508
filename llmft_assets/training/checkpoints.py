"""Training checkpoints: a small store protocol, a local implementation, and the Trainer hook.

A checkpoint is a Trainer `checkpoint-<step>` directory (adapter weights, optimizer, scheduler, RNG
states, trainer_state.json). The store publishes it atomically: files go to a temporary directory, are
fsynced, the directory is renamed into place, and a COMPLETE marker is written last. `latest()` only
ever returns checkpoints with the marker, so a writer killed mid-copy leaves nothing a reader trusts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@runtime_checkable
class CheckpointStore(Protocol):
    """Where training checkpoints live between (possibly killed) runs."""

    def latest(self) -> Path | None:
        """A local directory holding the newest complete checkpoint, or None."""
        ...

    def save(self, step: int, local_checkpoint_dir: Path) -> str:
        """Publish a finished local checkpoint directory; returns its URI."""
        ...


def checkpoint_step(path: Path) -> int:
    """The global step of a `checkpoint-<step>` directory."""
    match = _CHECKPOINT_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"not a checkpoint directory name: {path}")
    return int(match.group(1))


def finished_checkpoint(path: Path, max_steps: int = -1) -> bool:
    """True when resuming from the checkpoint would train zero steps.

    With a step budget (``max_steps > 0``, the new run's) that is when the checkpoint already reached it;
    a larger budget resumes (training is extended). Without one (epochs) the run's own end counts
    (trainer_state: global_step >= its max_steps): the same data and epochs give the same end.
    """
    state_file = Path(path) / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    global_step = int(state.get("global_step") or 0)
    if max_steps > 0:
        return global_step >= max_steps
    run_end = int(state.get("max_steps") or 0)
    return run_end > 0 and global_step >= run_end


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalCheckpointStore:
    """Checkpoints under `root/checkpoint-<step>/`, published atomically, newest `keep_last` kept."""

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last

    def _complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _CHECKPOINT_DIR.match(child.name)
            if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        checkpoints = self._complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def save(self, step: int, local_checkpoint_dir: Path) -> str:
        source = Path(local_checkpoint_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {source}")
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"checkpoint-{int(step)}"
        staging = self.root / f".tmp-checkpoint-{int(step)}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(source, staging)
        _fsync_tree(staging)
        if final.exists():
            # a resumed run re-saving the same step: move the old copy aside, never leave a gap mid-rename
            retired = self.root / f".old-checkpoint-{int(step)}-{uuid.uuid4().hex[:8]}"
            final.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(final)
        _fsync_dir(self.root)
        marker = final / COMPLETE_MARKER
        marker_tmp = final / f".{COMPLETE_MARKER}.tmp"
        marker_tmp.write_text(json.dumps({"step": int(step), "completed_at": time.time()}))
        with open(marker_tmp, "rb") as handle:
            os.fsync(handle.fileno())
        marker_tmp.rename(marker)
        _fsync_dir(final)
        self._prune()
        return final.resolve().as_uri()

    def _prune(self) -> None:
        checkpoints = self._complete_checkpoints()
        for _, path in checkpoints[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        # leftovers of writers that died mid-copy
        for child in self.root.glob(".tmp-checkpoint-*"):
            if time.time() - child.stat().st_mtime > 3600:
                shutil.rmtree(child, ignore_errors=True)


def make_checkpoint_callback(store: CheckpointStore, log: Callable[[str], None] = print) -> Any:
    """A TrainerCallback that publishes every Trainer checkpoint to `store` (rank 0, after all ranks wrote)."""
    from transformers import TrainerCallback

    class CheckpointPublishCallback(TrainerCallback):
        def __init__(self) -> None:
            self.published: list[tuple[int, str]] = []

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch.distributed as dist

            # every rank writes its own RNG state into the checkpoint; publish only once all are done
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if not state.is_world_process_zero:
                return
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not local.is_dir():
                log(f"checkpoint: expected {local} after save, not found; not published")
                return
            uri = store.save(state.global_step, local)
            self.published.append((state.global_step, uri))
            log(f"checkpoint: step {state.global_step} published to {uri}")

    return CheckpointPublishCallback()
