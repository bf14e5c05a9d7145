"""Search an index built by `flows.index`: print the top-k images, or serve a web page.

    python -m flows.search --index data/index --text "a red star" -k 10
    python -m flows.search --index data/index --image query.jpg -k 10
    python -m flows.search --index data/index --text "a red star" --image query.jpg --weight 0.7
    python -m flows.search --index data/index --serve --port 8000    # then open the printed URL

The model is the checkpoint the index names (or --checkpoint, which must be the same model:
another one is refused). Not a Prefect flow on purpose: a query is interactive, and waiting for
an orchestrator's API to start would cost more than the query. The query API is
tasks/search.py (`SearchIndex`).
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("search"))

import logging
import sys

from clip_model.checkpoint import CheckpointError
from flows import cli
from storage.embeddings import IndexFormatError
from tasks.params.search import SearchParams
from tasks.search import Hit, SearchError, SearchIndex, create_app


def format_hits(hits: list[Hit]) -> str:
    """The hits as a plain-text table: rank, score, shard, key, caption."""
    lines = [f"{'rank':>4}  {'score':>7}  {'shard':<7}{'key':<16}caption"]
    for rank, h in enumerate(hits, 1):
        caption = h.caption if len(h.caption) <= 70 else h.caption[:67] + "..."
        lines.append(f"{rank:>4}  {h.score:>7.4f}  {h.shard:<7}{h.key:<16}{caption}")
    return "\n".join(lines)


def run(args: SearchParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        index = SearchIndex.open(
            args.index,
            checkpoint=args.checkpoint,
            data=args.data,
            allow_torchscript=args.allow_torchscript,
            model=args.model,
        )
    except (IndexFormatError, FileNotFoundError, CheckpointError) as e:  # a mismatched model too
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.serve:
        import uvicorn

        print(f"{args.index}: {len(index)} images; serving on http://{args.host}:{args.port}/")
        uvicorn.run(create_app(index), host=args.host, port=args.port, log_level="warning")
        return 0
    image = None
    if args.image is not None:
        with open(args.image, "rb") as f:
            image = f.read()
    try:
        hits = index.query(text=args.text, image=image, weight=args.weight, k=args.k)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_hits(hits))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("search", argv)
