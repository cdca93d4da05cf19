"""Shared command lines for the CLI tests (tiny models, a few tokens)."""

from __future__ import annotations

import os
from pathlib import Path


def search_args(model, text, out, *extra) -> list[str]:
    """``evosearch search`` on a tiny model: drop 2 blocks, 3 generations, two stages."""
    return [
        "search", "--model", str(model), "--drop", "2", "--data", str(text),
        "--n-sequences", "4", "--seq-len", "16", "--generations", "3", "--offspring", "4",
        "--initial-population", "4", "--stages", "16:2,64:1", "--out", str(out), *extra,
    ]  # fmt: skip


SHARED_DATA = Path(
    os.environ.get("EVOSEARCH_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def shared_data(*parts: str):
    """The path of ``../shared/data/<parts>`` beside the checkout (or ``$EVOSEARCH_DATA_DIR``).

    A user's fresh clone has no ``../shared``: the calling test is skipped with the reason.
    Under CI (``CI`` set) the data must be there, so its absence fails the test instead.
    """
    import pytest

    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = f"{path} not found (real data lives in ../shared beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared data: {reason}")
        pytest.skip(reason)
    return path
