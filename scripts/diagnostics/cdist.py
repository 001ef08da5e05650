"""Relative distances between conditions of prompt pairs, and the relation words' input embeddings.
usage: cdist.py MODEL...  (a Blip3o folder; or an understanding-stage model: random queries are then used)"""
import sys, torch
from blip3o import Blip3o
torch.set_num_threads(1)
PAIRS = [("a photo of a square above a circle", "a photo of a square below a circle", "above/below"),
         ("a photo of a square left of a circle", "a photo of a square right of a circle", "left/right"),
         ("a photo of a square above a circle", "a photo of a square left of a circle", "above/left"),
         ("a photo of a cross below a triangle", "a photo of a cross above a triangle", "below/above 2"),
         ("a photo of a circle right of a cross", "a photo of a circle left of a cross", "right/left 2"),
         ("a photo of two squares", "a photo of three squares", "two/three"),
         ("a photo of a square", "a photo of a triangle", "square/triangle"),
         ("a photo of a red square and a blue circle", "a photo of a blue square and a red circle", "colour swap")]
for path in sys.argv[1:]:
    m = (Blip3o.from_preset(path) if path in ("debug", "nano") else Blip3o.from_pretrained(path, dtype=torch.float32)).eval()
    with torch.no_grad():
        for a, b, name in PAIRS:
            c = m.condition([a, b]).float()
            print(f"{path}  {name:16s} {((c[0]-c[1]).norm()/c[0].norm()).item():.3f}")
        tok = m.backbone.processor.tokenizer if hasattr(m.backbone, "processor") else None
        emb = m.backbone.model.get_input_embeddings().weight
        # the words as prompts hold them (after a space: `Ġleft`); sessions 9 and 10 read the rows of the bare
        # words (`left`), which no prompt uses (session 15)
        ids = {w: tok.convert_tokens_to_ids("Ġ" + w) for w in ["above", "below", "left", "right", "circle", "square"]}
        print("ids", ids)
        for x, y in [("above", "below"), ("left", "right"), ("above", "left"), ("circle", "square")]:
            ex, ey = emb[ids[x]], emb[ids[y]]
            print(f"emb {x}/{y}: dist {(ex-ey).norm():.3f} norms {ex.norm():.3f} {ey.norm():.3f}")
