"""Errors a user can fix, and writes that a kill never leaves half-done.

Every expected failure is a :class:`UserError`: *what* went wrong, *where* (the file, flag or
config key to look at) and *why*; the CLI prints it as one line,
``evosearch: error: <what> (<where>): <why>``. Everything a later command treats as final is
written to a temporary path beside its target and renamed into place
(:func:`atomic_write_text`, :func:`atomic_dir`), so a reader sees the old version or the new
one, never a part.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARK",
    "UserError",
    "atomic_dir",
    "atomic_write_text",
    "read_json",
    "remove_stale_temporaries",
]

# Temporary names carry this mark, so a later run can recognise what a killed one left behind.
TMP_MARK = ".evosearch-tmp-"


class CandidateError(ValueError):
    """A candidate that cannot be evaluated by its own fault (e.g. a pruning metric whose
    scores are unusable): the failure is final, like a non-finite fitness, and is not retried
    on resume."""


class UserError(ValueError):
    """An expected failure with a message the user can act on.

    Args:
        what: what failed, e.g. ``"cannot read the checkpoint"``.
        where: the file, flag or config key concerned (may be empty).
        why: the reason and, where there is one, the fix.

    Example:
        >>> str(UserError("bad config value", "num_drop", "expected int, got 'two'"))
        "bad config value (num_drop): expected int, got 'two'"
    """

    def __init__(self, what: str, where: str | os.PathLike | None, why: str) -> None:
        self.what, self.where, self.why = what, str(where or ""), why
        super().__init__(f"{what} ({self.where}): {why}" if self.where else f"{what}: {why}")

    def __reduce__(self):  # pickles across processes (Ray workers) with all three parts
        return (type(self), (self.what, self.where, self.why))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: a reader, or a kill, sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_MARK}{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` when the block finishes.

    An existing ``path`` is replaced only after the new folder is complete; if the block
    raises, the temporary folder is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_dir("run/model") as tmp:   # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_MARK}{path.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_MARK}{path.name}.old."))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left in ``folder`` (names with :data:`TMP_MARK`); returns
    the removed paths. Call it only where no other process writes at the same time."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for item in folder.iterdir():
        if item.name.startswith(TMP_MARK):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def read_json(path: str | os.PathLike, what: str = "cannot read") -> Any:
    """Parse a JSON file; a missing, non-UTF-8 or malformed file is a :class:`UserError`
    naming it (and the line of a syntax error)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(what, path, "no such file") from None
    except UnicodeDecodeError:
        raise UserError(what, path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            what, path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except IsADirectoryError:
        raise UserError(what, path, "a directory, not a file") from None


_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test hook: with ``EVOSEARCH_KILL_AT=name`` (or ``name:N``, the N-th time this point is
    reached), the process kills itself here with SIGKILL, as a power cut or the OOM killer
    would. Costs one environment lookup otherwise."""
    wanted = os.environ.get("EVOSEARCH_KILL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file at ``path`` is unreadable (truncated, no header), or ``None``.
    Reads only the header: the data must reach the last tensor's end offset."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes, no header)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name} is truncated ({size} bytes, header of {n})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"{path.name} is unreadable ({type(exc).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        return f"{path.name} is truncated ({size} bytes, needs {8 + n + max(ends)})"
    return None
