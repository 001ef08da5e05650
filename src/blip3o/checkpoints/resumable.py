"""Training checkpoints that survive a crash at any moment: a run is never left without its newest complete
checkpoint, and the next start finds it.

    OUT/checkpoint/            the checkpoint a run resumes from; complete whenever it exists
        trainer_state.pt       (what the trainer's `fill` writes)
        complete.json          {"step": N}, written last, once every other file is on disk
    OUT/.checkpoint.tmp-*      a checkpoint being written; after a swap, the one it replaced
    OUT/.checkpoint.old-*      the one replaced, where folders cannot be swapped in one step

`save` writes a temporary folder, syncs it, writes complete.json into it, swaps it in for checkpoint/
(`blip3o.checkpoints.atomic.swap_in`: one atomic exchange on Linux, else two renames) and removes the one it
replaced, complete.json first, so that a partly removed folder is never taken for a complete one. Whatever
a crash (kill -9, power loss) interrupts, a complete checkpoint of the newest step saved survives:

    while writing              the temporary has no complete.json; checkpoint/ is the previous one
    after complete.json        checkpoint/ is the previous one; the temporary holds the new one, complete
    between the two renames    no checkpoint/; the previous one is .checkpoint.old-*, the new one the temporary
    after the swap             checkpoint/ is the new one; the previous one lies beside it, complete or not

`recover`, which the trainer runs before it resumes, makes checkpoint/ the complete folder of the highest
step, promoting a temporary or a moved-aside one where that is it, and removes every other: the stale and
the incomplete. It returns one line for each thing it did, for the log.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from blip3o.checkpoints import CheckpointError, read_json
from blip3o.checkpoints.atomic import remove, swap_in, sync_file, sync_folder, sync_tree

NAME = "checkpoint"
MARKER = "complete.json"
LEFTOVERS = (f".{NAME}.tmp-", f".{NAME}.old-")  # prefixes of the folders a save leaves while it runs


def save(out_dir: str | Path, step: int, fill: Callable[[Path], None]) -> Path:
    """Write OUT/checkpoint/ for `step`: `fill(folder)` writes the state into a temporary folder, which becomes
    the checkpoint once complete (see the module docstring). An error in `fill` removes the temporary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=LEFTOVERS[0], dir=out))
    try:
        fill(tmp)
        sync_tree(tmp)
        write_marker(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replaced = swap_in(tmp, out / NAME)
    if replaced is not None:
        discard(replaced)
    return out / NAME


def recover(out_dir: str | Path) -> list[str]:
    """Make OUT/checkpoint/ the newest complete checkpoint a crash left, and remove the other leftovers of
    `save`; returns what it did, one line each (nothing when there was nothing to do)."""
    out, notes = Path(out_dir), []
    if not out.is_dir():
        return notes
    target = out / NAME
    leftovers = sorted(p for p in out.iterdir() if p.name.startswith(LEFTOVERS))
    complete = {p: step for p in leftovers if (step := read_marker(p)) is not None}
    newest = max(complete, key=complete.__getitem__, default=None)
    # checkpoint/ is complete whenever it exists (one without complete.json counts as older than any leftover)
    current = read_marker(target) if target.is_dir() else None
    current_step = -1 if current is None else current
    if newest is not None and (not os.path.lexists(target) or complete[newest] > current_step):
        replaced = swap_in(newest, target)
        notes.append(f"{out}: resuming from {newest.name} (step {complete[newest]}), a complete checkpoint that a "
                     f"crash left before it became {NAME}/")
        leftovers = [p for p in leftovers if p != newest] + ([replaced] if replaced is not None else [])
    for path in leftovers:
        if os.path.lexists(path):
            step = read_marker(path)
            discard(path)
            what = "incomplete" if step is None else f"superseded, step {step}"
            notes.append(f"{out}: removed {path.name} ({what}), a leftover of an interrupted checkpoint save")
    return notes


def write_marker(folder: Path, step: int) -> None:
    """complete.json: the folder's files are all on disk and hold the state after `step` steps."""
    path = folder / MARKER
    path.write_text(json.dumps({"step": step}))
    sync_file(path)
    sync_folder(folder)


def read_marker(folder: Path) -> int | None:
    """The step a folder's complete.json names; None for a folder without a valid one (incomplete)."""
    try:
        step = read_json(folder / MARKER).get("step")
    except CheckpointError:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def discard(folder: Path) -> None:
    """Remove a checkpoint folder, complete.json first: a removal cut short leaves an incomplete folder."""
    if (folder / MARKER).is_file():
        (folder / MARKER).unlink()
        sync_folder(folder)
    remove(folder)
