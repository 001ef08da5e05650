"""filter_tag.py SRC OUT TAG: the samples of SRC shards whose prompt has TAG, as new shards."""
import io, json, sys, tarfile
from pathlib import Path
from blip3o.shapes.data import iter_samples, _add
src, out, tag = sys.argv[1:4]
Path(out).mkdir(parents=True, exist_ok=True)
k = 0
tar = None
for image, meta in iter_samples(Path(src)):
    if not meta.get("prompt") or meta["prompt"]["tag"] != tag:
        continue
    if k % 1000 == 0:
        if tar: tar.close()
        tar = tarfile.open(Path(out) / f"shapes-{k // 1000:06d}.tar", "w", format=tarfile.USTAR_FORMAT)
    png = io.BytesIO(); image.save(png, format="PNG")
    meta = {kk: v for kk, v in meta.items() if not kk.startswith("__")}
    _add(tar, f"{k:09d}.png", png.getvalue()); _add(tar, f"{k:09d}.json", json.dumps(meta).encode())
    k += 1
tar.close()
print(k, "samples")
