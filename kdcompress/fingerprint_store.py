"""A run folder that keeps every version of a stage, one folder per fingerprint.

Layout::

    RUN/stages/layout.json                      {"layout": "fingerprint"}: how this folder is kept
    RUN/stages/<name>/<fingerprint>/            one verified stage folder (meta.json + artifact)
    RUN/stages/<name>/<fingerprint>.lock        held by the process computing that version
    RUN/stages/<name>/.tmp-new-<pid>/          a version being written by process <pid>

``kdcompress run`` keeps one folder per stage name (:class:`~kdcompress.store.RunStore`): a stage
computed with other settings replaces the previous one. A search runs many concrete pipelines
into one folder: trial 2 with ``rank=4`` and trial 3 with ``rank=8`` must both stay, so that
trial 4 with ``rank=4`` loads its student instead of training it again. Each version lives in
its own folder, verified, committed and loaded by a :class:`~kdcompress.store.RunStore` rooted at
``RUN/stages/<name>`` (the same checksums, atomic rename and trusted-class rules), and a version
is computed under a lock of its own, so several search workers share one folder: the first to
need the teacher trains it, the others wait and load it. There is no folder-wide lock for a
run's life.

A folder made by ``kdcompress run`` becomes this layout the first time a search uses it (its
stages move under their fingerprints, so they stay cached), and from then on ``kdcompress run``
into it uses this layout too: ``kdcompress run RUN/search/best-size.py`` loads every stage the
search computed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from kdcompress.artifacts import OnnxModel
from kdcompress.errors import CorruptStage, StoreError
from kdcompress.store import Entry, RunStore

__all__ = ["FingerprintStore", "LAYOUT_FILE", "is_fingerprint_layout"]

LAYOUT_FILE = "layout.json"
_LAYOUT = {"layout": "fingerprint", "version": 1}


def is_fingerprint_layout(run_dir: str | os.PathLike) -> bool:
    """Whether the run folder keeps one folder per stage fingerprint."""
    try:
        doc = json.loads((Path(run_dir) / "stages" / LAYOUT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("layout") == "fingerprint"


class FingerprintStore:
    """One run folder with a folder per stage version; the interface of
    :class:`~kdcompress.store.RunStore` with the fingerprint passed along.

    Parameters
    ----------
    run_dir : path
        The folder; a ``kdcompress run`` folder in it is converted when the store is opened.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / "stages"
        self._root = RunStore(self.run_dir)

    def _versions(self, name: str) -> RunStore:
        """A plain store whose "stages" are the versions of stage ``name``."""
        store = RunStore(self.run_dir)
        store.stage_dir = self.stage_dir / name
        return store

    def folder(self, name: str, fingerprint: str) -> Path:
        """Where version ``fingerprint`` of stage ``name`` lives."""
        return self.stage_dir / name / fingerprint

    # -- opening ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, *, wait: bool = True,
               on_wait: Callable[[str], None] | None = None) -> Iterator[FingerprintStore]:
        """Open the folder for a run: convert a ``kdcompress run`` folder (under its lock, so
        no run by stage name is writing into it), remove temporary folders of dead processes.

        Unlike :meth:`RunStore.locked` nothing is held for the run's life: each version is
        computed under its own lock (:meth:`claim`).
        """
        self.adopt(wait=wait, on_wait=on_wait)
        for folder in [self.stage_dir, *sorted(p for p in self.stage_dir.iterdir()
                                               if p.is_dir() and not p.name.startswith("."))]:
            store = self._versions(folder.name) if folder != self.stage_dir else self._root
            store.clean_stale()
        yield self

    def adopt(self, *, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        """Make the run folder keep one folder per fingerprint, moving the stages of a
        ``kdcompress run`` folder under their fingerprints."""
        if is_fingerprint_layout(self.run_dir):
            return
        with self._root.locked(wait=wait, on_wait=on_wait):
            if is_fingerprint_layout(self.run_dir):  # converted while this process waited
                return
            for folder in sorted(p for p in self.stage_dir.iterdir()
                                 if p.is_dir() and not p.name.startswith(".")):
                self._adopt_stage(folder)
            try:
                with open(self.stage_dir / LAYOUT_FILE, "w", encoding="utf-8") as f:
                    f.write(json.dumps(_LAYOUT))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise StoreError(f"cannot write {self.stage_dir / LAYOUT_FILE}: "
                                 f"{exc.strerror or exc}") from exc

    def _adopt_stage(self, folder: Path) -> None:
        meta = self._root.meta(folder.name)
        if meta is None or not isinstance(meta.get("fingerprint"), str):
            return  # not a complete stage: nothing worth keeping, left where it is
        tmp = self.stage_dir / f".tmp-adopt-{folder.name}-{os.getpid()}"
        try:
            os.replace(folder, tmp)
            folder.mkdir()
            os.replace(tmp, folder / meta["fingerprint"])
        except OSError as exc:
            raise StoreError(f"cannot move stages/{folder.name} under its fingerprint: "
                             f"{exc.strerror or exc}") from exc

    @contextlib.contextmanager
    def claim(self, name: str, fingerprint: str) -> Iterator[None]:
        """Hold the lock of one stage version while it is looked up and, if missing, computed:
        another process needing the same version waits, then loads it."""
        import filelock

        (self.stage_dir / name).mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.stage_dir / name / f"{fingerprint}.lock"))
        try:
            with lock:
                yield
        except filelock.Timeout as exc:  # pragma: no cover - no timeout is set
            raise StoreError(f"cannot lock stages/{name}/{fingerprint}") from exc

    # -- reading ----------------------------------------------------------------------------

    def meta(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The ``meta.json`` of one version, or ``None`` when there is none or it is unreadable.
        """
        return self._versions(name).meta(fingerprint)

    def lookup(self, name: str, fingerprint: str) -> Entry | None:
        """The verified entry of version ``fingerprint`` of stage ``name``, if stored.

        Raises
        ------
        CorruptStage
            A file of the version was changed, removed or leads outside its folder; the message
            names the file as ``stages/<name>/<fingerprint>/<file>``.
        """
        try:
            entry = self._versions(name).lookup(fingerprint, fingerprint)
        except CorruptStage as exc:
            raise CorruptStage(_where(str(exc), name, fingerprint)) from exc
        return None if entry is None else Entry(name, entry.folder, entry.meta)

    def load(self, entry: Entry, *, trusted_modules: Collection[str] | None = None) -> Any:
        """The artifact of a verified entry (see :meth:`RunStore.load`)."""
        return self._versions(entry.name).load(entry, trusted_modules=trusted_modules)

    # -- writing ----------------------------------------------------------------------------

    def begin(self, name: str) -> Path:
        """A fresh temporary folder for a version of stage ``name``, owned by this process
        (``stages/<name>/.tmp-new-<pid>``: a process writes one version of a stage at a time)."""
        return self._versions(name).begin("new")

    def discard(self, tmp: Path) -> None:
        """Remove a temporary folder that will not be committed."""
        shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, name: str, tmp: Path, artifact: nn.Module | OnnxModel,
               meta: dict[str, Any]) -> tuple[Any, Entry]:
        """Commit a version into ``stages/<name>/<meta["fingerprint"]>`` (see
        :meth:`RunStore.commit`)."""
        fingerprint = meta["fingerprint"]
        artifact, entry = self._versions(name).commit(fingerprint, tmp, artifact, meta)
        return artifact, Entry(name, entry.folder, entry.meta)


def _where(message: str, name: str, fingerprint: str) -> str:
    """A plain store's message names ``stages/<fingerprint>``; the version is
    ``stages/<name>/<fingerprint>``."""
    return message.replace(f"stages/{fingerprint}", f"stages/{name}/{fingerprint}")

