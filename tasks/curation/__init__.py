"""Curation as a library (no Prefect): the filter spec, the filters, the image pass and the writer.

spec = load_filter_spec("configs/filters/sample.yaml")
ds, bad = open_input("data/crawl")
sel = select_samples(ds, spec, bad_shards=bad)
write_curated(ds, sel, "data/curated", num_shards=spec.num_shards, parameters={...})
"""

from tasks.curation.filters import FILTERS
from tasks.curation.run import (
    REJECTED_NAME,
    UNDECODABLE,
    Selection,
    existing_output,
    open_input,
    select_samples,
    shard_sizes,
    write_curated,
)
from tasks.curation.spec import FilterSpec, FilterSpecError, load_filter_spec, parse_filter_spec

__all__ = [
    "FILTERS",
    "REJECTED_NAME",
    "UNDECODABLE",
    "FilterSpec",
    "FilterSpecError",
    "Selection",
    "existing_output",
    "load_filter_spec",
    "open_input",
    "parse_filter_spec",
    "select_samples",
    "shard_sizes",
    "write_curated",
]
