"""Curation as a library (no Prefect): the filter spec, the filters, the image pass and the writer.

spec = load_filter_spec("configs/filters/sample.yaml")
ds, bad = open_input("data/crawl")
sel = select_samples(ds, spec, bad_shards=bad, engine=Engine(workers=4))
write_curated(ds, sel, "data/curated", num_shards=spec.num_shards, parameters={...},
              val_fraction=spec.val_fraction, engine=Engine(workers=4))

The names below are imported on first use (PEP 562), so the filter spec (tasks.curation.spec)
validates without loading torch: the `curate` command line checks it before starting anything.
"""

import importlib

_EXPORTS = {
    "FILTERS": "tasks.curation.filters",
    "REJECTED_NAME": "tasks.curation.run",
    "UNDECODABLE": "tasks.curation.run",
    "Selection": "tasks.curation.run",
    "existing_output": "tasks.curation.run",
    "open_input": "tasks.curation.run",
    "select_samples": "tasks.curation.run",
    "shard_sizes": "tasks.curation.write",
    "write_curated": "tasks.curation.write",
    "FilterSpec": "tasks.curation.spec",
    "FilterSpecError": "tasks.curation.spec",
    "load_filter_spec": "tasks.curation.spec",
    "parse_filter_spec": "tasks.curation.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
