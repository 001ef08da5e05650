"""The training stream: samples of a spec's sources, split over ranks and loader workers, shuffled, resumable.

Each loader worker of each rank is one *unit* of the stream (unit = rank * workers + worker, units = world
size * workers). For each source and epoch the pieces (tar shards, runs of JSONL lines or folder images, a
JSON array) are put in an order seeded by (seed, source, epoch); a unit reads every units-th piece of it, or,
where a source has fewer pieces than there are units, every piece keeping every units-th record. So an
epoch of a source is read once over all units, and nothing is held whole: a unit holds one window.

A unit fills a window of `window` raw records, each from a source drawn by its mixing weight, permutes it and
decodes the records in that order, skipping bad ones (`DataStats`); the draws and the permutation come from a
generator seeded by (seed, units, unit, window number). A window is cheap to rebuild from where its sources
stood when it began, which is the whole resume state: (window number, the sources' cursors at its start,
records of it taken). The stream is deterministic given (seed, rank, world size,
workers, batch size) and an interrupted run resumed from a saved state yields exactly what the
uninterrupted one would have (torchdata's StatefulDataLoader keeps each worker's state beside its batches).

Each sample carries `problems`: what its unit skipped since its previous sample (a finite stream ends with a
sample that is nothing else), so that the main process counts every problem of every worker; `DataStream`
takes them off and keeps the counts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from blip3o.distributed import World

from .readers import Reader, Record, reader_for
from .spec import Source, SpecError, parse_spec
from .stats import DataStats, Problem, Skip
from .targets import TargetsReader

WINDOW = 1000  # raw records shuffled together (each a few hundred KB at most for tar shards)


def source_reader(source: Source) -> Reader:
    """The reader of any source a spec names: a CLIP-target cache's, or `reader_for`'s."""
    return TargetsReader(source) if source.kind == "targets" else reader_for(source)


class EmptyUnit(SpecError):
    """A source that gives a unit of the stream no record in a whole epoch: fewer records than units."""


class SourceStream:
    """One source's raw records for one unit, from a cursor on: epoch after epoch, each epoch's pieces in
    their seeded order. `cursor` always says where the next record is."""

    def __init__(self, reader: Reader, index: int, unit: int, units: int, *, seed: int, epochs: int | None,
                 shuffle: bool, cursor: dict, report) -> None:
        self.reader, self.index, self.unit, self.units = reader, index, unit, units
        self.seed, self.epochs, self.shuffle, self.report = seed, epochs, shuffle, report
        self.cursor = dict(cursor)  # epoch, piece (of this unit's list), record (of the piece), seen (this epoch)
        self._records = self._read()

    def next(self) -> Record | None:
        """The next record, or None once every epoch is read (a finite stream)."""
        return next(self._records, None)

    def plan(self, epoch: int) -> tuple[list, bool]:
        """This unit's pieces of `epoch`, and whether it keeps only every units-th record of them."""
        pieces = self.reader.pieces()
        order = np.arange(len(pieces))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(pieces))
        if len(pieces) >= self.units:
            return [pieces[i] for i in order[self.unit::self.units]], False
        return [pieces[i] for i in order], True

    def _read(self) -> Iterator[Record]:
        c = self.cursor
        while self.epochs is None or c["epoch"] < self.epochs:
            whole, kept = c["piece"] == 0 and c["record"] == 0, 0
            pieces, split = self.plan(c["epoch"])
            while c["piece"] < len(pieces):
                for record in self.reader.records(pieces[c["piece"]], c["record"], self.report):
                    c["record"] += 1
                    c["seen"] += 1
                    if not split or (c["seen"] - 1) % self.units == self.unit:
                        kept += 1
                        yield record
                c["piece"], c["record"] = c["piece"] + 1, 0
            if whole and not kept and self.epochs is None:
                raise EmptyUnit(f"{self.reader.source.name} has no record for unit {self.unit} of {self.units} "
                                f"(ranks x loader workers): it holds fewer records than that")
            c.update(epoch=c["epoch"] + 1, piece=0, record=0, seen=0)


class StreamingDataset(IterableDataset):
    """Samples of a spec's sources (readers.py says their form), for a DataLoader's workers on one rank.

    `epochs` None streams forever (training: a step count ends it), else each source ends after that many
    epochs and the mixture draws from the sources left. `shuffle` False reads every source in its own order
    (a data check). state_dict()/load_state_dict() are a worker's resume state (module docstring)."""

    def __init__(self, spec: str | os.PathLike | Sequence | list[Source], *, seed: int = 0,
                 world: World | None = None, epochs: int | None = None, shuffle: bool = True,
                 window: int = WINDOW, image_root: str | os.PathLike | None = None) -> None:
        is_sources = isinstance(spec, list) and spec and all(isinstance(s, Source) for s in spec)
        self.sources: list[Source] = spec if is_sources else parse_spec(spec, image_root=image_root)
        if (epochs is not None and epochs < 1) or window < 1:
            raise ValueError(f"epochs (None or >= 1) and window (>= 1) out of range: {epochs}, {window}")
        self.seed, self.world, self.epochs, self.shuffle, self.window = seed, world or World(), epochs, shuffle, window
        weights = np.array([s.weight for s in self.sources])
        self.weights = weights / weights.sum()
        self.stats = DataStats()  # what this process's iteration met (a worker's own, under a DataLoader)
        self._state: dict | None = None
        self._resume: dict | None = None

    def unit(self) -> tuple[int, int]:
        """(this process's unit, units): rank * workers + worker of world size * workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.world.rank * workers + worker, self.world.size * workers

    def _fresh_state(self) -> dict:
        unit, units = self.unit()
        cursors = [{"epoch": 0, "piece": 0, "record": 0, "seen": 0} for _ in self.sources]
        return {"seed": self.seed, "sources": [s.name for s in self.sources], "unit": unit, "units": units,
                "window": 0, "cursors": cursors, "taken": 0}

    def state_dict(self) -> dict:
        """Where this unit stands: plain values (a checkpoint loads them with weights_only=True)."""
        state = self._state or self._resume or self._fresh_state()
        return {**state, "cursors": [dict(c) for c in state["cursors"]]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next iteration; refused if it was saved for another stream."""
        fresh = self._fresh_state()
        for key in ("seed", "sources", "unit", "units"):
            if state.get(key) != fresh[key]:
                raise ValueError(f"the data state was saved with {key} {state.get(key)!r}, this stream has "
                                 f"{fresh[key]!r}: resume with the same spec, seed, world size and loader workers")
        self._resume = state

    def __iter__(self) -> Iterator[dict]:
        state, self._resume = self._resume or self._fresh_state(), None
        pending: list[Problem] = []  # met since the last sample; a state is saved at a sample, with none pending

        def report(problem: Problem) -> None:
            pending.append(problem)
            self.stats.add(problem)

        unit, units = state["unit"], state["units"]
        readers = [source_reader(s) for s in self.sources]
        streams = [SourceStream(r, i, unit, units, seed=self.seed, epochs=self.epochs, shuffle=self.shuffle,
                                cursor=c, report=report) for i, (r, c) in enumerate(zip(readers, state["cursors"],
                                                                                         strict=True))]
        window, taken = state["window"], state["taken"]
        while True:
            start = [dict(s.cursor) for s in streams]
            rng = np.random.default_rng([self.seed, units, unit, window])
            known = len(pending)
            refs = self._fill(streams, rng)
            if taken:  # a resumed window: the problems met filling it were counted before the state was saved
                del pending[known:]
            if not refs:
                break
            order = rng.permutation(len(refs)) if self.shuffle else range(len(refs))
            for k in range(taken, len(refs)):
                index, record = refs[order[k]]
                try:
                    sample = readers[index].load(record)
                except Skip as e:
                    report(Problem(record.file, record.at, e.reason, str(e)))
                    continue
                sample["problems"], pending = pending, []
                self.stats.good += 1
                self._state = {**state, "window": window, "cursors": start, "taken": k + 1}
                yield sample
            window, taken = window + 1, 0
        if pending:
            yield {"problems": pending}

    def _fill(self, streams: list[SourceStream], rng: np.random.Generator) -> list[tuple[int, Record]]:
        """Up to `window` (source index, record) pairs, each source drawn by weight among those not finished."""
        refs: list[tuple[int, Record]] = []
        live = list(range(len(streams)))
        while len(refs) < self.window and live:
            p = self.weights[live] / self.weights[live].sum()
            index = live[rng.choice(len(live), p=p)] if len(live) > 1 else live[0]
            record = streams[index].next()
            if record is None:
                live.remove(index)
            else:
                refs.append((index, record))
        return refs


class DataStream:
    """Batches (lists of samples) of a StreamingDataset for one training process, with the state to resume them.

        stream = DataStream(StreamingDataset(spec, seed=seed, world=world), batch_size=per_rank, num_workers=4)
        stream.load_state_dict(checkpoint["data"])     # resuming: before iterating
        for batch in stream: ...                         # a list of `batch_size` samples (readers.py)
        checkpoint["data"] = stream.state_dict()         # beside the model's state, at the same step
        log(stream.stats.summary())                      # good and bad samples of every worker so far

    A batch is `batch_size` samples; in a finite stream the last batches may be smaller."""

    def __init__(self, dataset: StreamingDataset, *, batch_size: int, num_workers: int = 0) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata calls a deprecated torch hook
            self.loader = StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=list)
        self.stats = DataStats()

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.loader:
            samples = [sample for sample in batch if self._count(sample)]
            if samples:
                yield samples

    def _count(self, sample: dict) -> bool:
        """Take the sample's problems into the stats; False for a sample that only carried problems."""
        for problem in sample.pop("problems"):
            self.stats.add(problem)
        if sample:
            self.stats.good += 1
        return bool(sample)

    def state_dict(self) -> dict:
        """The loader's state (every worker's, and which worker is next) and the stats: plain values."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "loader": self.loader.state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "num_workers"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the data state was saved with {key} {state[key]}, this stream has "
                                 f"{getattr(self, key)}: resume with the same {key}")
        self.loader.load_state_dict(state["loader"])
        self.stats.load_state_dict(state["stats"])
