"""The before/after probe table of README.md from two outputs of ``probes.py``.

Usage: ``python experiments/reliability/table.py before.jsonl after.jsonl > table.md``
"""

from __future__ import annotations

import json
import re
import sys


def _short(text: str, n: int = 150) -> str:
    text = re.sub(r"/tmp/[^ )'`]*/(p\d+|run|tmp\w*)/", "", text)
    text = re.sub(r"/tmp/tmp\w+/", "", text)
    text = text.removeprefix("evosearch: error: ").replace("|", "\\|").replace("`", "'")
    return text if len(text) <= n else text[: n - 3] + "..."


def _outcome(row: dict | None) -> str:
    if row is None:
        return "(not probed)"
    if "last" not in row:
        return str(row["code"])
    tags = []
    if row["traceback"]:
        tags.append("traceback")
    elif row["lines"] > 1:
        tags.append(f"{row['lines']} lines")
    if row["left_out_dir"]:
        tags.append("left out dir")
    head = f"exit {row['code']}" + (f" ({', '.join(tags)})" if tags else "")
    return f"{head}: `{_short(row['last'])}`"


def main(before: str, after: str) -> None:
    old = {r["probe"]: r for r in map(json.loads, open(before, encoding="utf-8"))}
    new = [json.loads(line) for line in open(after, encoding="utf-8")]
    print("| # | probe | before (e417ef3) | after |")
    print("|---|---|---|---|")
    for i, row in enumerate(new, 1):
        probe = row["probe"]
        print(f"| {i} | {probe} | {_outcome(old.get(probe))} | {_outcome(row)} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
