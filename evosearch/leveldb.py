"""Level databases: every unit's tensors pre-computed at every compression level, on disk.

EvoPress (Sieberling et al. 2024, Sec. 3.2) builds, once per model, calibration set and
compressor, a database holding each layer at each level; a search then only *looks up* the
levels of a candidate. Here a database is a directory with one safetensors file per unit (tensor
names ``"<level>"`` or ``"<level>.<part>"``) and ``meta.json`` (the key it was built for, the
unit names, sizes and build time). Files are opened memory-mapped, so a candidate reads only the
layers it changes. A database is keyed by a hash of everything that determines its contents
(see :func:`fingerprint`), built into a temporary directory and renamed into place, so a killed
build never leaves a half-written database behind and a finished one is reused by every search
with the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from evosearch.errors import UserError, kill_point, read_json, safetensors_problem

__all__ = [
    "LevelDatabase",
    "LevelDatabaseError",
    "fingerprint",
    "model_fingerprint",
    "remove_stale_builds",
    "tensor_fingerprint",
]

FORMAT = 1
# In a build's temporary folder while it runs: which process builds it (host, pid).
BUILDER_FILE = "builder.json"


class LevelDatabaseError(RuntimeError):
    """A database file could not be read during a search (an environment failure: the
    evaluation that met it is retried on ``--resume``)."""


def _builder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_builds(root: str | Path) -> list[Path]:
    """Delete the temporary folders of builds under ``root`` whose process (on this host) is
    gone: a killed build's leftovers. Builds still running, or on other hosts, are kept."""
    removed = []
    for tmp in Path(root).glob(".*-*"):
        info = tmp / BUILDER_FILE
        if not tmp.is_dir() or not info.is_file():
            continue
        try:
            builder = json.loads(info.read_text())
        except (OSError, ValueError):
            continue  # being written right now
        if builder.get("host") == socket.gethostname() and not _alive(int(builder["pid"])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def tensor_fingerprint(t: torch.Tensor) -> str:
    """A sha256 of a tensor's shape, dtype and contents."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module, *, samples: int = 4096) -> str:
    """A sha256 over every parameter's name, shape and a strided sample of its values: any
    retrained or differently quantised checkpoint changes it, without hashing gigabytes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """The database key of ``parts`` (JSON-able; order of keys does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class LevelDatabase:
    """A built database, read-only. Use :meth:`open_or_build` to get one.

    Attributes:
        path: its directory.
        meta: ``meta.json``: ``key``, ``parts`` (what the key hashes), ``units``,
            ``build_seconds``, ``bytes`` and any extra fields of the builder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = self.path / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{self.path} is not a level database (no meta.json)")
        self.meta: dict[str, Any] = read_json(meta, "cannot read the level database")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: unsupported database format {self.meta.get('format')}")
        self._files = {u: self.path / f"{i:05d}.safetensors" for i, u in enumerate(self.units)}
        self._handles: dict[str, Any] = {}

    @property
    def units(self) -> list[str]:
        return self.meta["units"]

    @property
    def size_bytes(self) -> int:
        return int(self.meta["bytes"])

    def get(self, unit: str, level: int | str, part: str | None = None) -> torch.Tensor:
        """The stored tensor of ``unit`` at ``level`` (and ``part``, when units store several);
        ``level`` may also name a tensor that is not per level (e.g. ``"rank"``)."""
        if unit not in self._files:
            raise KeyError(f"unit {unit!r} is not in the database at {self.path}")
        handle = self._handles.get(unit)
        file = self._files[unit]
        if handle is None:
            try:
                handle = self._handles[unit] = safe_open(str(file), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
                raise LevelDatabaseError(
                    f"cannot read level database file {file}: {exc}"
                ) from None
        name = str(level) if part is None else f"{level}.{part}"
        if name not in handle.keys():
            raise KeyError(f"unit {unit!r} has no level {name!r} in {self.path}")
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - a file damaged after it was opened
            raise LevelDatabaseError(f"cannot read level database file {file}: {exc}") from None

    def check(self) -> None:
        """Raise a :class:`~evosearch.errors.UserError` naming the first unit file that is
        missing or truncated (reads only the headers)."""
        for file in self._files.values():
            problem = "missing" if not file.is_file() else safetensors_problem(file)
            if problem:
                raise UserError(
                    "damaged level database",
                    file,
                    f"{problem}; delete {self.path} and rerun to rebuild it",
                )

    def __getstate__(self) -> dict[str, Any]:  # open file handles do not pickle (Ray workers)
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    @classmethod
    def open_or_build(
        cls,
        root: str | Path,
        parts: dict[str, Any],
        units: list[str],
        build: Callable[[], Iterable[tuple[str, dict[str, torch.Tensor]]]],
        *,
        log: Callable[[str], None] = print,
        extra_meta: dict[str, Any] | None = None,
    ) -> LevelDatabase:
        """The database for ``parts`` under ``root``; built first if missing.

        Args:
            root: directory holding databases, one subdirectory per key.
            parts: everything that determines the contents (hashed into the key).
            units: unit names, in the order ``build`` yields them.
            build: yields ``(unit, {tensor name: tensor})`` for every unit, in order.
            log: progress messages.
            extra_meta: more JSON-able fields for ``meta.json``.
        """
        key = fingerprint(parts)
        path = Path(root) / key
        if (path / "meta.json").is_file():
            db = cls(path)
            db.check()
            log(f"level database: reusing {path} ({db.size_bytes / 2**20:.0f} MiB)")
            return db
        Path(root).mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_builds(root):
            log(f"level database: removed {stale}, left by a killed build")
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        (tmp / BUILDER_FILE).write_text(json.dumps(_builder()))
        t0 = time.perf_counter()
        try:
            total = 0
            for i, (_unit, tensors) in enumerate(_checked(build(), units)):
                file = tmp / f"{i:05d}.safetensors"
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
                total += file.stat().st_size
                kill_point("leveldb_build")
            meta = {
                "format": FORMAT,
                "key": key,
                "parts": parts,
                "units": units,
                "bytes": total,
                "build_seconds": round(time.perf_counter() - t0, 2),
                **(extra_meta or {}),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            (tmp / BUILDER_FILE).unlink()
            try:
                tmp.rename(path)
            except OSError:  # another process finished the same database first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        db = cls(path)
        log(
            f"level database: built {path} ({db.size_bytes / 2**20:.0f} MiB, "
            f"{db.meta['build_seconds']:.1f}s)"
        )
        return db


def _checked(
    items: Iterable[tuple[str, dict[str, torch.Tensor]]], units: list[str]
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    n = 0
    for unit, tensors in items:
        if n >= len(units) or unit != units[n]:
            raise ValueError(f"the builder yielded unit {unit!r} out of order")
        n += 1
        yield unit, tensors
    if n != len(units):
        raise ValueError(f"the builder yielded {n} of {len(units)} units")
