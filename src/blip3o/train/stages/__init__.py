"""The four training stages of the recipe, by name; each names what it trains and freezes the rest.

    clip           the CLIP encoder (+ a text tower kept only for training), sigmoid contrastive
    understanding  the backbone, next-token loss on the answers of a conversation about the image
    decoder        the decoder: frozen encoder tokens -> pixels (its own diffusion loss)
    generation     queries + DiT: flow matching on the frozen encoder's tokens, backbone frozen
    edit           queries + DiT: flow matching to an edit's target, reading the source image(s) and the instruction

Each stage's options are a dataclass in its module; a data world adds options, turns and loss terms
through `hooks.Auxiliary`. Every random draw comes from `blip3o.train.streams`.
"""

from blip3o.train.stages.base import Stage
from blip3o.train.stages.clip import ClipStage
from blip3o.train.stages.decoder import DecoderStage
from blip3o.train.stages.edit import EditStage
from blip3o.train.stages.generation import GenerationStage
from blip3o.train.stages.hooks import Auxiliary, register_auxiliary
from blip3o.train.stages.understanding import UnderstandingStage

STAGES: dict[str, type[Stage]] = {s.name: s for s in (ClipStage, UnderstandingStage, DecoderStage, GenerationStage,
                                                         EditStage)}

# The Shapes world's auxiliaries register themselves (blip3o.shapes.training): imported here, last, so that
# every stage built from this registry sees them.
import blip3o.shapes.training  # noqa: E402, F401, I001

__all__ = ["STAGES", "Auxiliary", "ClipStage", "DecoderStage", "EditStage", "GenerationStage", "Stage",
           "UnderstandingStage", "register_auxiliary"]
