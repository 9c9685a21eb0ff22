"""Inputs and outputs of the batch commands: nothing lost, nothing clobbered.

* ``check_writable``: an output's folder exists and takes files, before any work starts.
* ``atomic_write``: whole-file outputs go to a temporary file in the same folder and are
  renamed over the target (``os.replace``) only when complete, so an interrupted run never
  leaves half a file under the user's name.
* ``ResultLog``: record-by-record JSONL outputs (``generate``, ``submit``) that append each
  record whole and flushed, hold an exclusive lock while a run writes, refuse a file that
  is not theirs, and say which records are already done so a rerun resumes.
* ``read_lines``: text input decoded line by line, so a byte that is not UTF-8 is named
  by file and line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

__all__ = ["OutputError", "check_writable", "atomic_write", "read_lines", "ResultLog", "content_keys", "open_locked"]


class OutputError(ValueError):
    """An output that cannot be written, or would destroy something; the message says which."""


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path, or ``OutputError`` when a file cannot be created or replaced there."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: the folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} exists and is not writable")
    return path


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that exists and takes files, or can be made; ``OutputError`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent if probe.parent != probe else Path(".")
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {probe} is not a writable folder")
    return path


def _read_umask() -> int:
    mask = os.umask(0)  # there is no way to read it without setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", private: bool = False, **open_kwargs) -> Iterator[IO]:
    """A file object whose content replaces ``path`` in one step when the block ends
    without an error; on an error the temporary file is removed and ``path`` is untouched.

    The new file keeps the permissions of the file it replaces (or gets the usual ones);
    ``private``: readable by its owner only, from the first byte (keys).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:  # mkstemp creates the file 0600
        if not private:
            os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file; ``InputFileError`` names the line of a bad byte."""
    path = Path(path)
    out = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputFileError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
    if out and out[0].startswith("\ufeff"):  # a byte-order mark from Windows editors
        out[0] = out[0][1:]
    return out


class InputFileError(ValueError):
    """An input file that cannot be read as asked; the message names file and line."""


def content_keys(items: list, key_of: Callable[[object], str]) -> list[str]:
    """A stable key per item from its content: ``<hash>-<n>`` where n counts earlier items
    with the same content, so duplicates stay distinct and editing other lines (or moving
    them) keeps every key."""
    seen: dict[str, int] = {}
    keys = []
    for it in items:
        h = hashlib.sha256(key_of(it).encode("utf-8")).hexdigest()[:12]
        seen[h] = seen.get(h, 0) + 1
        keys.append(f"{h}-{seen[h]}")
    return keys


def open_locked(path: Path, what: str | None = None) -> IO:
    """``path`` opened for reading and appending (created if missing) under an exclusive
    lock, held until the file is closed or the process ends (the OS releases it on a crash
    too); ``OutputError`` when another run holds it. ``filelock`` would need a side file:
    its lock file is opened with O_TRUNC, so it cannot lock an output itself."""
    f = open(path, "a+b")
    try:
        if sys.platform == "win32":  # pragma: no cover - not this project's CI
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OutputError(f"{what or path} is being written by another run (it holds the file's lock); wait for it "
                          "to finish, or write to another file") from None
    return f


class ResultLog:
    """A JSONL file of result records, one per line, that a rerun resumes.

    Parameters
    ----------
    path
        The output file.
    key
        The field that identifies a record (``id`` for generate, ``key`` for submit).
    fields
        Fields every record of this log has: a file whose lines lack them is not this
        command's output, and is refused rather than appended to.
    done
        Which records count as finished (others are run again); default: all.
    inputs
        Input files that must not be the output.
    """

    def __init__(self, path: str | os.PathLike, key: str, fields: tuple[str, ...],
                 done: Callable[[dict], bool] | None = None, inputs: tuple = ()):
        self.path = check_writable(path)
        self.key, self.fields, self.is_done = key, fields, done or (lambda r: True)
        for inp in inputs:
            if self.path.exists() and Path(inp).exists() and os.path.samefile(self.path, inp):
                raise OutputError(f"the output {self.path} is the input file {inp}; write the results elsewhere")
        self.f: IO | None = None
        #: records already in the file, by key (the last one of a key wins)
        self.records: dict[str, dict] = {}

    def open(self, restart: bool = False) -> "ResultLog":
        """Lock the file, read what it holds (checking that it is this command's), and
        leave it open for appending. ``restart``: drop earlier records first."""
        self.f = open_locked(self.path)
        try:
            self.f.seek(0)
            self._read(self.f.read())  # a file that is not ours is refused, --force or not
            if restart:
                self.f.truncate(0)
                self.records.clear()
        except BaseException:
            self.f.close()
            self.f = None
            raise
        return self

    def _read(self, data: bytes) -> None:
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" for a whole file
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            rec = self._record(raw)
            if rec is None:
                raise OutputError(
                    f"{self.path}:{n} is not a record of this command (expected a JSON object with "
                    f"{', '.join(self.fields)}); it is not overwritten: choose another output file")
            self.records[str(rec[self.key])] = rec
        if tail.strip():
            rec = self._record(tail)
            if rec is not None:  # a whole record whose newline was not written
                self.records[str(rec[self.key])] = rec
                self.f.seek(0, os.SEEK_END)
                self.f.write(b"\n")
                return
            if not self._looks_cut(tail):
                raise OutputError(f"{self.path}: its last line is not a record of this command; it is not "
                                  "overwritten: choose another output file")
            # the last record of an interrupted run, cut mid-line (records are written whole,
            # so only a crash during a write leaves this): drop it, it is done again
            self.f.truncate(len(data) - len(tail))
            self.f.seek(0, os.SEEK_END)

    def _looks_cut(self, tail: bytes) -> bool:
        """The start of one of this log's records (they begin with their key field) that
        is not valid JSON: the remains of a write that a crash interrupted."""
        if not tail.startswith(b'{"' + self.key.encode() + b'": '):
            return False
        try:
            json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return True
        return False  # whole JSON, but not one of our records: not ours to cut

    def _record(self, raw: bytes) -> dict | None:
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(rec, dict) or any(f not in rec for f in self.fields):
            return None
        return rec

    def done_keys(self) -> set[str]:
        return {k for k, r in self.records.items() if self.is_done(r)}

    def write(self, record: dict) -> None:
        """Append one record whole and flush it to the OS (an interrupted run keeps it)."""
        self.f.write((json.dumps(record, default=str) + "\n").encode("utf-8"))
        self.f.flush()
        self.records[str(record[self.key])] = record

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def __enter__(self) -> "ResultLog":
        return self if self.f is not None else self.open()

    def __exit__(self, *exc) -> None:
        self.close()


