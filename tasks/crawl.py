"""Run img2dataset in a process's main thread: `python -m tasks.crawl CONFIG.json`.

img2dataset installs a SIGINT handler, which Python allows only in the main thread (docs/design.md,
trap 2), so the ingest task launches this module as a subprocess instead of calling it in a
Prefect worker thread. CONFIG.json holds `img2dataset.download`'s keyword arguments.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tasks.crawl CONFIG.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        kwargs = json.load(f)
    from img2dataset import download

    download(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
