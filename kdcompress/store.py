"""The run folder: stage artifacts that can be trusted, committed atomically, one run at a time.

Layout::

    RUN/report.json report.md report.png   written by the report observer
    RUN/.lock  RUN/.lock.owner             held by the run that writes into RUN
    RUN/stages/<name>/meta.json            fingerprint, SHA-256 of every file, digests of inputs
    RUN/stages/<name>/...                  the artifact (module.json + weights, or model.onnx)
    RUN/stages/.tmp-<name>-<pid>/          a stage being written by process <pid>

A stage folder is used only when its ``meta.json`` parses, names the fingerprint asked for, and
every file it lists is inside the folder (no absolute path, no ``..``, no symlink leading out) with
the SHA-256 recorded when it was written; anything else raises
:class:`~kdcompress.errors.CorruptStage` and the stage is recomputed. Nothing is imported or
unpickled from the folder: torch weights are safetensors and module recipes may only name trusted
classes (:mod:`kdcompress.artifacts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdcompress.artifacts import OnnxModel, load_module, save_module
from kdcompress.errors import ArtifactError, CorruptStage, RunFolderLocked, StoreError
from kdcompress.fsutil import strict_json

__all__ = ["RunStore", "Entry", "pid_alive", "META_FILE", "ONNX_FILE"]

log = logging.getLogger(__name__)
META_FILE = "meta.json"
ONNX_FILE = "model.onnx"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
_CHUNK = 1 << 20


def dumps(value: Any) -> str:
    """Strict JSON text (``allow_nan=False``) of ``value``."""
    return json.dumps(strict_json(value), indent=1, allow_nan=False)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Entry:
    """A verified stage folder: its ``meta.json`` and where it is."""

    name: str
    folder: Path
    meta: dict[str, Any]

    @property
    def digest(self) -> str:
        """Hash of the artifact's files: what downstream stages record having read."""
        return str(self.meta["digest"])


class RunStore:
    """One run folder.

    Parameters
    ----------
    run_dir : path
        The folder; created when the run takes its lock.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / "stages"
        self._lock: Any = None

    # -- the lock ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise StoreError(f"run folder {self.run_dir} is a file, not a folder: pass another "
                             "--out")
        try:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run folder {self.stage_dir}: "
                             f"{exc.strerror or exc}") from exc

    def owner(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock: ``{"pid", "host", "since"}``, if recorded."""
        try:
            return json.loads((self.run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _owner_text(self) -> str:
        owner = self.owner() or {}
        return (f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}"
                if owner else "another process")

    @contextlib.contextmanager
    def locked(self, *, wait: bool = True,
               on_wait: Callable[[str], None] | None = None) -> Iterator[RunStore]:
        """Hold the run folder's lock for the block; clean up stale temporary folders first.

        Parameters
        ----------
        wait : bool
            Wait for a run that holds the lock (``on_wait`` is told once, naming its PID); with
            ``False`` raise :class:`StoreError` at once.

        Raises
        ------
        StoreError
            The folder cannot be created or is locked and ``wait`` is false.
        """
        import filelock

        self._prepare()
        lock = filelock.FileLock(str(self.run_dir / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            message = (f"run folder {self.run_dir} is in use by {self._owner_text()}")
            if not wait:
                raise RunFolderLocked(message + "; wait for it to finish or use another --out") \
                    from None
            if on_wait is not None:
                on_wait(message + "; waiting for it to finish (--no-wait exits instead)")
            lock.acquire()
        except OSError as exc:
            raise StoreError(f"cannot lock run folder {self.run_dir}: "
                             f"{exc.strerror or exc}") from exc
        self._lock = lock
        try:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            with contextlib.suppress(OSError):
                (self.run_dir / OWNER_FILE).write_text(json.dumps(owner))
            self.clean_stale()
            yield self
        finally:
            self._lock = None
            lock.release()

    def clean_stale(self) -> list[Path]:
        """Remove temporary stage folders whose writing process is no longer alive."""
        removed = []
        for tmp in self.stage_dir.glob(".tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        return removed

    # -- reading ----------------------------------------------------------------------------

    def meta(self, name: str) -> dict[str, Any] | None:
        """A stage's ``meta.json`` as written, or ``None`` when there is none or it is unreadable.
        """
        try:
            meta = json.loads((self.stage_dir / name / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def lookup(self, name: str, fingerprint: str) -> Entry | None:
        """The verified entry of stage ``name`` with ``fingerprint``.

        Returns ``None`` when there is none (never written, other settings, meta unreadable).

        Raises
        ------
        CorruptStage
            The folder has the fingerprint but a file was changed, removed, added outside the
            folder or is otherwise not what was written; the message names the file.
        """
        meta = self.meta(name)
        if meta is None or meta.get("fingerprint") != fingerprint:
            return None
        folder = self.stage_dir / name
        where = f"stages/{name}"
        if folder.is_symlink() or folder.resolve().parent != self.stage_dir.resolve():
            raise CorruptStage(f"{where} leads outside the run folder")
        files = meta.get("files")
        if not isinstance(files, dict) or not files or not isinstance(meta.get("digest"), str):
            raise CorruptStage(f"{where}/{META_FILE} lists no file checksums")
        for file, expected in files.items():
            path = self._inside(folder, file, where)
            if not path.is_file():
                raise CorruptStage(f"{where}/{file} is missing")
            if file_sha256(path) != expected:
                raise CorruptStage(f"{where}/{file} changed since it was written")
        if meta.get("format") == "onnx":
            file = meta.get("file")
            if file not in files:
                raise CorruptStage(f"{where}/{META_FILE} names an ONNX file it does not checksum: "
                              f"{file!r}")
        elif meta.get("format") != "torch":
            raise CorruptStage(f"{where}/{META_FILE} has an unknown format "
                               f"{meta.get('format')!r}")
        if _digest(files) != meta["digest"]:
            raise CorruptStage(f"{where}/{META_FILE} digest does not match its files")
        return Entry(name, folder, meta)

    @staticmethod
    def _inside(folder: Path, file: Any, where: str) -> Path:
        if (not isinstance(file, str) or not file or file in (".", "..") or "/" in file
                or "\\" in file or os.path.isabs(file)):
            raise CorruptStage(f"{where}/{META_FILE} names {file!r}, which is not a plain file "
                               "name inside the stage folder")
        path = folder / file
        if path.is_symlink() or path.resolve().parent != folder.resolve():
            raise CorruptStage(f"{where}/{file} is a link leading outside the stage folder")
        return path

    def load(self, entry: Entry, *, trusted_modules: Collection[str] | None = None) -> Any:
        """The artifact of a verified entry.

        Raises
        ------
        CorruptStage
            The files verify but do not load (a recipe naming an untrusted class, bad weights).
        """
        try:
            if entry.meta["format"] == "onnx":
                model = OnnxModel(entry.folder / entry.meta["file"])
                _ = model.num_params  # parses the graph: a file that is not ONNX fails here
                return model
            return load_module(entry.folder, trusted_modules=trusted_modules)
        except (ArtifactError, OSError, ValueError) as exc:
            raise CorruptStage(f"stages/{entry.name} cannot be loaded: {exc}") from exc
        except Exception as exc:  # onnx's DecodeError and friends: a file that does not parse
            raise CorruptStage(f"stages/{entry.name} cannot be loaded: {type(exc).__name__}: "
                               f"{exc}") from exc

    # -- writing ----------------------------------------------------------------------------

    def begin(self, name: str) -> Path:
        """A fresh temporary folder for stage ``name``, owned by this process."""
        tmp = self.stage_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise StoreError(f"cannot write into {self.stage_dir}: {exc.strerror or exc}") \
                from exc
        return tmp

    def discard(self, tmp: Path) -> None:
        """Remove a temporary folder that will not be committed."""
        shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, name: str, tmp: Path, artifact: nn.Module | OnnxModel,
               meta: dict[str, Any]) -> tuple[Any, Entry]:
        """Save ``artifact`` into ``tmp``, checksum and fsync every file, rename it into place.

        Returns the artifact as it now lives in the run folder and its entry. On any error the
        temporary folder is removed and a :class:`StoreError` names the path and the OS error.
        """
        try:
            meta = dict(meta)
            if isinstance(artifact, OnnxModel):
                try:
                    relative = artifact.path.resolve().relative_to(tmp.resolve())
                except ValueError:
                    artifact = artifact.copy_to(tmp, ONNX_FILE)
                    relative = Path(ONNX_FILE)
                if len(relative.parts) != 1:
                    artifact = artifact.copy_to(tmp, ONNX_FILE)
                    relative = Path(ONNX_FILE)
                meta.update(format="onnx", file=str(relative))
                keep = {p.name for p in artifact.files}
                for extra in list(tmp.iterdir()):  # scratch files of the stage are not kept
                    if extra.name not in keep:
                        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
            else:
                save_module(artifact.cpu().eval(), tmp)
                meta.update(format="torch")
            files = {}
            for path in sorted(tmp.iterdir()):
                if not path.is_file() or path.is_symlink():
                    raise StoreError(f"stage '{name}' left {path.name} in its folder, which is "
                                     "not a plain file")
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                files[path.name] = file_sha256(path)
            meta.update(files=files, digest=_digest(files))
            with open(tmp / META_FILE, "w", encoding="utf-8") as f:
                f.write(dumps(meta))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            final = self.stage_dir / name
            if final.exists() or final.is_symlink():
                trash = self.stage_dir / f".tmp-old-{name}-{os.getpid()}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.stage_dir)
        except OSError as exc:
            self.discard(tmp)
            path = exc.filename or tmp
            raise StoreError(f"cannot write stage '{name}' to {path}: "
                             f"{exc.strerror or exc}") from exc
        except BaseException:
            self.discard(tmp)
            raise
        entry = Entry(name, final, meta)
        if isinstance(artifact, OnnxModel):
            artifact = OnnxModel(final / meta["file"])
        return artifact, entry


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:20]
