"""centreprobe.py MODEL CHECKPOINT_DIR [N]: how well the understanding stage's object head (kept in the
checkpoint, `aux.object_head`) reads each object's shape and colour from the vision tower's merged token
at its centre, on N fresh Shapes scenes: does the vision tower say what the language model must read?"""
import sys
import torch
from blip3o import Blip3o
from blip3o.shapes.data import make_sample
from blip3o.train.stages import object_codes_of, N_SHAPE, N_COLOR

model_dir, ckpt = sys.argv[1:3]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
m = Blip3o.from_pretrained(model_dir, dtype=torch.float32).eval()
state = torch.load(f"{ckpt}/trainer_state.pt", map_location="cpu", weights_only=False)
w = state["ema"] if state.get("ema") else state["params"]
W, b = w["aux.object_head.weight"], w["aux.object_head.bias"]
items = []
for i in range(n):  # random scenes of 1 to 4 objects (as the evaluation's questions use), a seed no run trains on
    image, meta = make_sample(777, i, prompt_first=0.0)
    items.append({"image": image, "json": meta})
bb = m.backbone
seen = []
visual = bb.model.model.visual
hook = visual.register_forward_hook(lambda _m, _i, out: seen.append(out.pooler_output))
shape_ok = color_ok = held_n = none_ok = none_n = 0
with torch.no_grad():
    for k in range(0, n, 20):
        chunk = items[k:k + 20]
        texts = [bb.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], tokenize=False) for _ in chunk]
        inp = bb.processor(text=texts, images=[it["image"] for it in chunk], padding=True, return_tensors="pt")
        seen.clear()
        bb.model.model(**inp)
        out = seen[0].float() @ W.T + b
        codes = torch.cat([object_codes_of(it, 8, 8) for it in chunk])
        held = codes[:, 0] > 0
        pred_shape = out[:, :N_SHAPE].argmax(1)
        shape_ok += int((pred_shape[held] == codes[held, 0].long()).sum()); held_n += int(held.sum())
        color_ok += int((out[held, N_SHAPE:N_SHAPE + N_COLOR].argmax(1) == codes[held, 1].long()).sum())
        none_ok += int((pred_shape[~held] == 0).sum()); none_n += int((~held).sum())
hook.remove()
print({"objects": held_n, "shape": round(shape_ok / held_n, 3), "colour": round(color_ok / held_n, 3),
       "empty cells read none": round(none_ok / none_n, 3)})
