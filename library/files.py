"""Writing files safely: one atomic write, output folders checked before work starts, and the
leftovers of an interrupted save cleaned up.

Every file the trainer and the generator write (embeddings, latent caches, images) goes through
``write_atomically`` (images through ``save_image``): to a hidden temporary name next to the
target, then renamed over it, so a reader sees the old file or the whole new one, never half a
file, and a failed write leaves the old file as it was. A folder (a training state) is written
the same way by ``write_folder_atomically``. A process killed during a save leaves the hidden
temporary behind; ``remove_interrupted_saves`` clears those at the next start.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from library.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (requirements.txt)
    import tomli as tomllib

__all__ = [
    "ensure_writable_folder",
    "remove_interrupted_saves",
    "save_image",
    "tomllib",
    "write_atomically",
    "write_folder_atomically",
]

logger = logging.getLogger(__name__)

# Temporaries carry their writer's process id: ".<name>.p<pid>.<8 hex>.tmp" files (write_atomically),
# ".<name>-p<pid>-<8 hex>" folders (write_folder_atomically). Older versions wrote ".<name>.<8 hex>.tmp"
# and ".<name>-state-<8 letters or digits>", without the writer.
_TEMPORARY = re.compile(r"^\..+(?:\.p(?P<file_pid>\d+)\.[0-9a-f]{8}\.tmp|-p(?P<folder_pid>\d+)-[0-9a-f]{8})$")
_OLD_TEMPORARY_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_OLD_TEMPORARY_FOLDER = re.compile(r"^\..+-state-[a-z0-9_]{8}$")
OLD_TEMPORARY_AGE = (
    3600.0  # seconds: an older version's temporary this old has no live writer (a save takes seconds)
)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file in the same folder, then ``os.replace`` it into place.

    The temporary file gets the usual permissions (``0o666`` minus the umask), unlike
    ``tempfile``'s private ``0o600``. Any failure removes it and leaves the old file untouched;
    an ``OSError`` (missing folder, full disk, no permission) becomes a one-line ``UserError``.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.p{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def save_image(image, path: Path, **options) -> None:
    """A PIL image written atomically, in the format its suffix names (``options`` as ``Image.save``'s,
    e.g. ``pnginfo``)."""
    path = Path(path)
    image_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    write_atomically(path, lambda f: image.save(f, format=image_format, **options))


def write_folder_atomically(folder: Path, write: Callable[[Path], object]) -> None:
    """Fill a hidden temporary folder next to ``folder`` with ``write(temporary)``, then put it in
    place of ``folder``: a reader sees the old folder or the whole new one."""
    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}-p{os.getpid()}-{secrets.token_hex(4)}")
    try:
        temporary.mkdir()
        write(temporary)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {folder}: {exc.strerror or exc}") from exc
        raise


def read_text_file(path: str | Path, flag: str) -> str:
    """A text file a user named with ``flag``, as UTF-8 (a Windows editor's byte-order mark dropped);
    a missing, unreadable or non-UTF-8 file is one line naming both."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{flag} {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from None


def ensure_writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and prove it writable with a probe file, before any model loads,
    so that a wrong path costs seconds rather than a finished run."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: this is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{flag} {folder}: cannot create the folder ({exc.strerror or exc}); "
            "choose a folder you can write to"
        ) from None
    probe = folder / f".write-probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"{flag} {folder}: cannot write into this folder ({exc.strerror or exc}); "
            "choose a folder you can write to"
        ) from None


def remove_interrupted_saves(folder: Path) -> None:
    """Delete the hidden temporaries that killed processes left in ``folder``, never finished files.

    A temporary is removed only when its writer is gone: another run saving into the same folder
    at this moment keeps its temporaries (an older version's, which do not name their writer, are
    removed once they are an hour old).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    removed = []
    for entry in folder.iterdir():
        if not _left_by_a_dead_writer(entry):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    if removed:
        logger.info(
            "removed %d unfinished file(s) of an interrupted save: %s", len(removed), ", ".join(removed)
        )


def _left_by_a_dead_writer(entry: Path) -> bool:
    match = _TEMPORARY.match(entry.name)
    if match:
        pid = int(match.group("file_pid") or match.group("folder_pid"))
        return (entry.is_dir() == (match.group("folder_pid") is not None)) and not process_alive(pid)
    old = (entry.is_file() and _OLD_TEMPORARY_FILE.match(entry.name)) or (
        entry.is_dir() and _OLD_TEMPORARY_FOLDER.match(entry.name)
    )
    try:
        return bool(old) and time.time() - entry.stat().st_mtime > OLD_TEMPORARY_AGE
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (``os.kill`` with signal 0 asks without sending)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or the system cannot say: leave its files alone
    return True
