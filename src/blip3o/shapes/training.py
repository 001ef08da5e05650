"""What training learns from the Shapes world beyond images and texts: auxiliaries of the generic stages.

Each is a `blip3o.train.stages.hooks.Auxiliary`, registered below for its stage, with its stage options:

| stage         | auxiliary      | options              | adds                                                       |
|---------------|----------------|----------------------|------------------------------------------------------------|
| clip          | `ObjectCodes`  | `object_codes` = w   | w x the object-code loss of a linear read-out of the tokens |
| understanding | `ObjectLabels` | `object_labels` = w, | w x the loss of a read-out of the merged vision tokens:     |
|               |                | `object_labels_at`   | each object on its box centre's token, or on its whole box  |
| understanding | `ShapesTurns`  | `plan`, `reading`,   | k turns each: `plan` before the image turns, the others    |
|               |                | `locate`, `restate`  | after them                                                  |

An object code says, per cell of a grid over the image, whether an object's box centre lies in it and, if
so, the object's shape, colour, size and the centre's offset (`object_codes_of`). Objects keep 2 px apart,
so no 8 px cell holds two centres: with the read-out each object becomes one token that says everything
about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip3o.backbone import GENERATION_REQUEST
from blip3o.shapes.questions import locate_questions, plan_questions, reading_questions, restate_questions
from blip3o.shapes.world import COLORS, SHAPES, Scene
from blip3o.train.options import StageOptions, choice, count, weight
from blip3o.train.stages.base import training_head
from blip3o.train.stages.hooks import Auxiliary, register_auxiliary
from blip3o.train.streams import item_random

CELL_SHAPES = ("none", *SHAPES)  # a cell's shape class: 0 = no object there
CELL_COLORS = ("none", *COLORS)
CODE_GRID = 8  # the Shapes encoder's 8 x 8 token grid
N_SHAPE, N_COLOR = len(CELL_SHAPES), len(COLORS)
CODE_WIDTH = N_SHAPE + N_COLOR + 3  # shape (or none), colour, (size, dx, dy): the clip stage's read-out
CENTRE_LABEL_WIDTH = CODE_WIDTH + 2  # ... and the centre in the image (x, y): the understanding stage's read-out


def object_codes_of(item: dict, rows: int = CODE_GRID, cols: int = CODE_GRID) -> torch.Tensor:
    """(rows * cols, 7) float, raster order over a rows x cols grid of cells on the item's image: per cell
    [shape index (0 = no box centre in the cell, -1 = no scene), colour index, (size - 15) / 3, the
    centre's offset from the cell's centre in half-cells (x, y), the centre in the image (x, y)], all but
    the first only where a centre lies. Sizes 12..18, offsets and image coordinates map to [-1, 1].
    Centres are at least 12 px apart in x or 14 in y: on 8 px cells or finer no cell holds two (on coarser
    grids the first object of the scene keeps the cell)."""
    scene = (item.get("json") or {}).get("scene")
    codes = torch.zeros(rows * cols, 7)
    if scene is None:
        codes[:, 0] = -1
        return codes
    width, height = item["image"].size
    cw, ch = width / cols, height / rows
    for obj in Scene.from_dict(scene).objects:
        col, row = min(int(obj.cx // cw), cols - 1), min(int(obj.cy // ch), rows - 1)
        if codes[row * cols + col, 0] > 0:  # only on grids coarser than 8 x 8 cells: keep the first object
            continue
        codes[row * cols + col] = torch.tensor([
            CELL_SHAPES.index(obj.shape), COLORS.index(obj.color), (obj.size - 15) / 3,
            (obj.cx - (col + 0.5) * cw) / (cw / 2), (obj.cy - (row + 0.5) * ch) / (ch / 2),
            2 * obj.cx / width - 1, 2 * obj.cy / height - 1])
    return codes


def cell_labels(item: dict, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) long: (shape, colour) index in CELL_SHAPES, CELL_COLORS of the object whose box holds
    each cell's centre (0 = none) on a rows x cols grid over the image, raster order; -1 everywhere without
    a scene."""
    scene = (item.get("json") or {}).get("scene")
    labels = torch.full((rows * cols, 2), -1 if scene is None else 0, dtype=torch.long)
    if scene is None:
        return labels
    width, height = item["image"].size
    for obj in Scene.from_dict(scene).objects:
        x0, y0, x1, y1 = obj.box
        for r in range(rows):
            for c in range(cols):
                cx, cy = (c + 0.5) * width / cols, (r + 0.5) * height / rows
                if x0 <= cx < x1 and y0 <= cy < y1:
                    labels[r * cols + c] = torch.tensor([CELL_SHAPES.index(obj.shape), CELL_COLORS.index(obj.color)])
    return labels


def cell_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A read-out (cells, len(CELL_SHAPES) + len(CELL_COLORS)) against `cell_labels` (cells, 2): shape and
    colour cross-entropy over the cells of known scenes."""
    n, known = len(CELL_SHAPES), labels[:, 0] >= 0
    if not bool(known.any()):
        return 0.0 * out.sum()  # keeps every parameter in the graph (gradients are averaged over processes)
    out = out.float()
    return F.cross_entropy(out[known, :n], labels[known, 0]) + F.cross_entropy(out[known, n:], labels[known, 1])


def code_loss(out: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A read-out (..., N_SHAPE + N_COLOR + k) against `object_codes_of` targets (..., 7): cross-entropy
    of each cell's shape (or none) over cells of known scenes; colour cross-entropy and the squared error
    of the first k numbers (size, offset, position) over cells that hold a centre."""
    out, codes = out.reshape(-1, out.shape[-1]).float(), codes.reshape(-1, codes.shape[-1])
    k = out.shape[1] - N_SHAPE - N_COLOR
    known, held = codes[:, 0] >= 0, codes[:, 0] > 0
    if not bool(known.any()):
        return 0.0 * out.sum()  # keeps every parameter in the graph (gradients are averaged over processes)
    loss = F.cross_entropy(out[known, :N_SHAPE], codes[known, 0].long())
    if bool(held.any()):
        obj = out[held]
        loss = loss + F.cross_entropy(obj[:, N_SHAPE:N_SHAPE + N_COLOR], codes[held, 1].long())
        loss = loss + F.mse_loss(obj[:, N_SHAPE + N_COLOR:], codes[held, 2:2 + k])
    return loss


@dataclass(frozen=True)
class ObjectCodesOptions(StageOptions):
    # weight 16: a linear probe then reads an object's shape from the token of its centre at 0.92 (0.78 at 4,
    # 0.42 at 1, chance 0.25), and the decoder draws every scene of real tokens right; nano: 16
    object_codes: float = weight(0.0)


@register_auxiliary
class ObjectCodes(Auxiliary):
    """Clip stage: a linear head reads each token's object code; its code loss joins SigLIP's."""

    stage, name, Options = "clip", "object_codes", ObjectCodesOptions

    def __init__(self, model, options):
        super().__init__(model, options)
        self.head = training_head(model.clip_encoder.width, CODE_WIDTH, model.device)

    @classmethod
    def switched_on(cls, options):
        return options.object_codes > 0

    def collate(self, items, batch):
        return {"codes": torch.stack([object_codes_of(it) for it in items])}  # (B, 64, 7)

    def loss(self, batch, features):
        return self.options.object_codes * code_loss(self.head(features), batch["codes"])  # features (B, 64, C)

    def parameters(self):
        return [(f"head.{n}", p) for n, p in self.head.named_parameters()]


@dataclass(frozen=True)
class ObjectLabelsOptions(StageOptions):
    # the backbone's vision tower starts from nothing; this read-out is its pretraining. nano: 1 at "centre"
    object_labels: float = weight(0.0)
    # "centre": each object labelled on the one merged token of its box centre with its object code and centre
    # in the image, so that objects become single tokens that can be counted and compared (VQA 0.961 against
    # 0.840 with "box", count 0.94 against 0.67); "box": every token whose cell centre its box holds, with its
    # shape and colour
    object_labels_at: str = choice("box", "centre")


@register_auxiliary
class ObjectLabels(Auxiliary):
    """Understanding stage: a linear head reads, from each merged vision token, the object at its cell (see
    `object_labels_at`); its loss joins the answers' loss."""

    stage, name, Options = "understanding", "object_labels", ObjectLabelsOptions
    wants_features = True

    def __init__(self, model, options):
        super().__init__(model, options)
        width = CENTRE_LABEL_WIDTH if options.object_labels_at == "centre" else len(CELL_SHAPES) + len(CELL_COLORS)
        self.head = training_head(model.backbone.hidden_size, width, model.device)

    @classmethod
    def switched_on(cls, options):
        return options.object_labels > 0

    def collate(self, items, batch):
        merge = self.model.backbone.config.spatial_merge_size
        labels_of = object_codes_of if self.options.object_labels_at == "centre" else cell_labels
        grids = batch["inputs"]["image_grid_thw"].tolist()  # (t, h, w) patches of each image
        return {"cell_labels": torch.cat([labels_of(item, int(h) // merge, int(w) // merge)
                                          for item, (_, h, w) in zip(items, grids, strict=True)])}  # (cells, 7 or 2)

    def loss(self, batch, features):
        out = self.head(features)  # features (cells, H): every image's merged tokens, raster order
        read = code_loss if self.options.object_labels_at == "centre" else cell_loss
        return self.options.object_labels * read(out, batch["cell_labels"])

    def parameters(self):
        return [(f"head.{n}", p) for n, p in self.head.named_parameters()]


@dataclass(frozen=True)
class ShapesTurnsOptions(StageOptions):
    # k turns asking for a relation prompt in the generation request's words, answered by its two shapes in
    # reading order (`circle above square`). They open the conversation, so the first one's answer is predicted
    # at the token the generation condition's [IMG] and queries follow: eval position 0.59 -> 0.89; nano: 2
    plan: int = count(0)
    # up to k text-only turns: the caption, then a question answered from it alone (relations, their
    # converses, counts, colours, shapes)
    reading: int = count(0)
    # up to k turns `where is the {shape}?` -> the third of the image that holds its centre (`top left`, ...)
    locate: int = count(0)
    # k text-only turns `{A rel B}. the other way round?` -> `{B converse A}`: the language model must carry
    # what a relation word says; the condition of `left of` and `right of` prompts then differs 2.6x more
    # (0.044 -> 0.116); nano: 2
    restate: int = count(0)


@register_auxiliary
class ShapesTurns(Auxiliary):
    """Understanding stage: turns about the Shapes world's words, each kind from its own stream: `plan`
    before the image turns; `reading`, `locate` and `restate` after them."""

    stage, name, Options = "understanding", "shapes_turns", ShapesTurnsOptions

    @classmethod
    def switched_on(cls, options):
        return options.plan > 0 or options.reading > 0 or options.locate > 0 or options.restate > 0

    def turns(self, item, seed, index):
        o, meta = self.options, item.get("json") or {}
        plans = plan_questions(item_random(seed, index, "plan"), o.plan)
        after = []
        if o.reading and meta.get("caption"):
            after += reading_questions(meta["caption"], item_random(seed, index, "reading"), o.reading)
        if o.locate and meta.get("scene"):
            after += locate_questions(Scene.from_dict(meta["scene"]), item_random(seed, index, "locate"), o.locate)
        after += restate_questions(item_random(seed, index, "restate"), o.restate)
        return [(GENERATION_REQUEST + prompt, layout) for prompt, layout in plans], after
