"""Training data from users' own files: webdataset shards, JSONL, image folders, LLaVA conversations, edit triplets.

    spec.py     SPEC strings and spec files -> checked `Source`s (SpecError for what cannot be read as asked)
    readers.py  each kind of source: its pieces, their raw records, a record -> a sample (or a `Skip`)
    stream.py   StreamingDataset (split by rank and worker, shuffled, mixed, resumable) and DataStream (batches)
    stats.py    DataStats: good samples, bad ones by reason, the first problems whole
    check.py    `blip3o data check`: a data set read once, with counts, image and text summaries
"""

from .readers import caption_of
from .spec import KINDS, Source, SpecError, parse_spec
from .stats import REASONS, DataStats, Problem
from .stream import DataStream, EmptyUnit, StreamingDataset

__all__ = ["KINDS", "REASONS", "DataStats", "DataStream", "EmptyUnit", "Problem", "Source", "SpecError",
           "StreamingDataset", "caption_of", "parse_spec"]
