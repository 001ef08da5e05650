"""Stage options (one dataclass per stage, checked by name), the keyed random streams, and the auxiliary hook."""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blip3o import Blip3o
from blip3o.train.options import StageOptions, choice, count, flag, nonnegative, share, time_range, weight
from blip3o.train.stages import STAGES, Auxiliary, GenerationStage, UnderstandingStage, register_auxiliary
from blip3o.train.stages.hooks import AUXILIARIES
from blip3o.train.streams import STREAMS, item_generator, item_random, stream_seed
from train_helpers import tiny_dataset

CPU = torch.device("cpu")
STAGES_DIR = Path(__file__).parents[1] / "src" / "blip3o" / "train" / "stages"


@dataclass(frozen=True)
class Every(StageOptions):
    w: float = weight(0.0)
    n: float = nonnegative(0.0)
    p: float | None = share(None)
    q: float = share(0.5)
    k: int = count(1, minimum=1)
    on: bool = flag(False)
    at: str = choice("box", "centre")
    span: tuple[float, float] = time_range((0.3, 0.7))


RANGE = r"\[lo, hi\] with 0 < lo <= hi <= 1"
COUNT = "an integer >= 1 and at most 10000"


@pytest.mark.parametrize("name, bad, must", [
    ("w", -1, "a weight >= 0"), ("w", True, "a weight >= 0"), ("w", float("nan"), "a weight >= 0"),
    ("w", "1", "a weight >= 0"), ("n", -0.5, "a number >= 0"), ("p", 1.5, r"a share in \[0, 1\]"),
    ("q", None, r"a share in \[0, 1\]"), ("k", 0, COUNT), ("k", 2.0, COUNT), ("k", False, COUNT), ("k", 10**9, COUNT),
    ("on", 1, "true or false"), ("at", "center", "'box' or 'centre'"),
    ("span", [0.0, 0.5], RANGE), ("span", [0.6, 0.5], RANGE), ("span", 0.5, RANGE)])
def test_each_kind_refuses_bad_values_by_name(name, bad, must):
    with pytest.raises(ValueError, match=f"stage option {name} must be {must}, got"):
        Every(**{name: bad})


def test_kinds_convert_what_json_gives():
    o = Every(w=2, n=1, p=None, q=1, k=3, on=True, at="centre", span=[0.5, 0.5])
    assert (o.w, o.n, o.p, o.q, o.span) == (2.0, 1.0, None, 1.0, (0.5, 0.5))
    assert isinstance(o.w, float) and isinstance(o.span, tuple)


def test_unknown_options_are_refused_with_the_stages_options():
    model = Blip3o.from_preset("debug")
    with pytest.raises(ValueError, match="stage option text_weight is not an option of the understanding stage; "
                                         "its options: freeze_language, freeze_vision, locate, lora_alpha, "
                                         "lora_dropout, lora_rank, lora_targets, max_length, max_turns, "
                                         "object_labels, object_labels_at, plan, reading, restate"):
        UnderstandingStage(model, {"text_weight": 0.5})
    for stage, gone in [("generation", "draws"), ("generation", "code_loss"), ("clip", "patch_reconstruction"),
                        ("understanding", "questions"), ("understanding", "loss_per"), ("decoder", "object_codes")]:
        with pytest.raises(ValueError, match=f"stage option {gone} is not an option of the {stage} stage"):
            STAGES[stage].parse_options({gone: 1})
    with pytest.raises(ValueError, match="stage_options must be a mapping"):
        GenerationStage.parse_options(["prompt_share"])


def test_streams_are_keyed_by_seed_item_and_name():
    a = torch.rand(4, generator=item_generator(0, 7, "noise"))
    assert torch.equal(a, torch.rand(4, generator=item_generator(0, 7, "noise")))  # the same key, the same draws
    others = [item_generator(1, 7, "noise"), item_generator(0, 8, "noise"), item_generator(0, 7, "time")]
    assert all(not torch.equal(a, torch.rand(4, generator=g)) for g in others)
    assert item_random(0, 7, "turns").random() == item_random(0, 7, "turns").random()
    assert len({stream_seed(0, i, s) for i in range(50) for s in STREAMS}) == 50 * len(STREAMS)
    assert all(0 <= stream_seed(s, i, "text") < 2**63 for s in (0, 2**40) for i in (0, 10**9))
    with pytest.raises(ValueError, match="unknown random stream 'nois'; the streams: caption, turns"):
        item_generator(0, 7, "nois")


def test_an_items_draws_do_not_depend_on_its_batch_or_process():
    model = Blip3o.from_preset("debug")
    stage, data = GenerationStage(model, {}), tiny_dataset(8)
    whole = stage.collate(data, list(range(8)), 3, CPU)
    halves = [stage.collate(data[s:s + 4], list(range(s, s + 4)), 3, CPU) for s in (0, 4)]  # 2 processes
    for key in ("x_1", "t", "keep", "self_condition"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves])), key
    assert whole["prompts"] == halves[0]["prompts"] + halves[1]["prompts"]


def test_generic_stages_import_no_shapes_code():
    """The Shapes auxiliaries reach the stages only through the hook's registration (in the registry)."""
    for path in STAGES_DIR.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and m.startswith("blip3o.shapes")], path.name


@dataclass(frozen=True)
class EchoOptions(StageOptions):
    echo: int = count(0)
    echo_weight: float = weight(0.0)


class Echo(Auxiliary):
    """A test auxiliary: k turns `say {k}` -> `{k}` after the image turns, one opening turn, a batch entry, a
    loss term on the vision features and a parameter."""

    stage, name, Options = "understanding", "echo", EchoOptions
    wants_features = True

    def __init__(self, model, options):
        super().__init__(model, options)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    @classmethod
    def switched_on(cls, options):
        return options.echo > 0

    def turns(self, item, seed, index):
        return [("hello", "hi")], [(f"say {k}", str(k)) for k in range(self.options.echo)]

    def collate(self, items, batch):
        return {"echo_rows": torch.arange(len(items))}

    def loss(self, batch, features):
        return self.options.echo_weight * self.scale * features.pow(2).mean()

    def parameters(self):
        return [("scale", self.scale)]


@pytest.fixture
def echo_registered():
    register_auxiliary(Echo)
    yield Echo
    AUXILIARIES["understanding"].remove(Echo)


def test_an_auxiliary_adds_options_turns_entries_parameters_and_loss(echo_registered):
    model, data = Blip3o.from_preset("debug"), tiny_dataset(2)
    plain = UnderstandingStage(model, {})
    stage = UnderstandingStage(model, {"echo": 2, "echo_weight": 0.5})
    assert [type(a) for a in stage.auxiliaries] == [Echo] and UnderstandingStage(model, {"echo": 0}).auxiliaries == []
    turns, image_at = stage.conversation(data[0], 0, 0)
    assert turns == [("hello", "hi"), *plain.conversation(data[0], 0, 0)[0], ("say 0", "0"), ("say 1", "1")]
    assert image_at == 1
    assert [n for n, _ in stage.trainable(model)][-1] == "aux.echo.scale"
    batch = stage.collate(data, [0, 1], 0, CPU)
    assert torch.equal(batch["echo_rows"], torch.tensor([0, 1]))
    features = []
    visual = model.backbone.model.model.visual
    hook = visual.register_forward_hook(lambda _m, _i, out: features.append(out.pooler_output))
    try:
        with torch.no_grad():
            answers = plain.loss(batch)  # the answers' loss alone (the plain stage ignores the echo entries)
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(stage.loss(batch), answers + 0.5 * 2.0 * features[0].float().pow(2).mean())
    with pytest.raises(ValueError, match="stage option echo must be an integer >= 0 and at most 10000, got -1"):
        UnderstandingStage(model, {"echo": -1})
