"""splice.py BASE OUT part=MODEL...: BASE's model with the named parts (decoder, dit, queries, backbone,
clip_encoder) taken from other models; saved to OUT."""
import sys, torch
from blip3o import Blip3o
base, out, *parts = sys.argv[1:]
m = Blip3o.from_pretrained(base, dtype=torch.float32)
for spec in parts:
    name, src = spec.split("=")
    other = Blip3o.from_pretrained(src, dtype=torch.float32)
    if name == "queries":
        m.queries.data.copy_(other.queries.data)
    else:
        getattr(m, name).load_state_dict(getattr(other, name).state_dict())
    print("took", name, "from", src)
m.save_pretrained(out)
print("saved", out)
