"""Shared command lines for the CLI tests (tiny models, a few tokens)."""

from __future__ import annotations


def search_args(model, text, out, *extra) -> list[str]:
    """``evosearch search`` on a tiny model: drop 2 blocks, 3 generations, two stages."""
    return [
        "search", "--model", str(model), "--drop", "2", "--data", str(text),
        "--n-sequences", "4", "--seq-len", "16", "--generations", "3", "--offspring", "4",
        "--initial-population", "4", "--stages", "16:2,64:1", "--out", str(out), *extra,
    ]  # fmt: skip
