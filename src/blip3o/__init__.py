"""blip3o: BLIP3-o, the unified multimodal model that understands and generates images."""

from blip3o.model import Blip3o, Blip3oConfig
from blip3o.presets import DEFAULT_MODEL, PRESETS, get_preset

__all__ = ["DEFAULT_MODEL", "PRESETS", "Blip3o", "Blip3oConfig", "get_preset"]
__version__ = "0.1.0"
