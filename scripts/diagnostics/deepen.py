"""deepen.py BASE OUT LAYERS [FIELD=VALUE ...]: BASE with a fresh DiT of LAYERS layers (everything else, queries
included, kept); FIELD=VALUE pairs override DiTConfig fields (e.g. absolute_position=true)."""
import sys, dataclasses, json, torch
from blip3o import Blip3o
base, out, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
fields = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
m = Blip3o.from_pretrained(base, dtype=torch.float32)
cfg = dataclasses.replace(m.config, dit=dataclasses.replace(m.config.dit, num_layers=layers, **fields))
torch.manual_seed(0)
new = Blip3o(cfg)
sd = {k: v for k, v in m.state_dict().items() if not k.startswith("dit.")}
missing, unexpected = new.load_state_dict(sd, strict=False)
assert all(k.startswith("dit.") for k in missing) and not unexpected, (missing, unexpected)
new.tokenizer = m.tokenizer if hasattr(m, "tokenizer") else None
print("dit params", sum(p.numel() for p in new.dit.parameters()), "old", sum(p.numel() for p in m.dit.parameters()),
      "total", sum(p.numel() for p in new.parameters()))
new.save_pretrained(out)
print("saved", out)
