"""Turn the probe log of ``tests/test_reliability.py`` into the Markdown table of README.md.

    EVOSEARCH_PROBE_LOG=/tmp/probes.jsonl pytest -q tests/test_reliability.py
    python experiments/reliability/table.py /tmp/probes.jsonl > /tmp/table.md
"""

from __future__ import annotations

import json
import re
import sys


def main(path: str) -> None:
    print("| # | probe | exit | message (temporary paths shortened) |")
    print("|---|---|---|---|")
    for i, line in enumerate(open(path, encoding="utf-8"), 1):
        row = json.loads(line)
        message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+/", "", row["message"])
        message = message.removeprefix("evosearch: error: ").replace("|", "\\|")
        if len(message) > 160:
            message = message[:157] + "..."
        print(f"| {i} | {row['probe']} | {row['code']} | `{message}` |")


if __name__ == "__main__":
    main(sys.argv[1])
