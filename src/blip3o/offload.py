"""Offload: keep the idle parts of a Blip3o in CPU memory, and put each on the GPU only while it runs.

An 8B model in bf16 is ~17 GB of backbone, 2.7 GB of DiT and 5.2 GB of decoder: together they do not fit
a 24 GB card, but each one does. `Offload` keeps a CPU "home" copy of every weight and buffer; `use(part)`
points the part's tensors at fresh device copies, and leaving it points them back at the home copies (no
device-to-host copy: inference does not change weights) so the device memory is freed.

    offload = Offload(model, "cuda")
    with offload.use("backbone"):
        cond = model.condition(prompts)

`Blip3o.enable_offload(device)` installs one, and `generate`/`answer`/`reconstruct` then wrap each stage.
Captured CUDA graphs (`blip3o.accel`) stay correct without help from here: they fingerprint the weights'
addresses and capture again once a use points the weights at new device copies (so with offload they
capture at every use: the two do not speed each other up).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

PARTS = ("backbone", "dit", "clip_encoder", "decoder")


class Offload:
    """CPU-resident parts of `model`, moved to `device` one `use` at a time. The small `queries` stay on
    `device`, so `model.device` is where computation happens."""

    def __init__(self, model: nn.Module, device: str | torch.device, *, pin_memory: bool = False) -> None:
        self.model, self.device = model, torch.device(device)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.resident: list[str] = []  # parts on the device now, in the order they were put there
        self.moves = 0  # parts put on the device so far (tests read it)
        model.queries.data = model.queries.data.to(self.device)
        self._home = {name: self._make_home(getattr(model, name)) for name in PARTS}

    def _make_home(self, part: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
        """(module, name, is_parameter, CPU tensor) for every tensor of `part`; the part now points at them."""
        home = []
        for module in part.modules():
            for kind, tensors in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in tensors.items():
                    if tensor is None or tensor.is_meta:  # a part left unbuilt (e.g. in benchmarks) stays so
                        continue
                    cpu = tensor.detach().to("cpu")
                    if self.pin_memory:
                        cpu = cpu.pin_memory()
                    home.append((module, name, kind, cpu))
        self._point(home, lambda t: t)
        _drop_device_caches(part)
        return home

    @staticmethod
    def _point(home, place) -> None:
        """Point every tensor of `home` at `place(its CPU copy)`."""
        for module, name, is_parameter, cpu in home:
            if is_parameter:
                module._parameters[name].data = place(cpu)
            else:
                module._buffers[name] = place(cpu)

    def load(self, name: str) -> None:
        """Put part `name` on the device (a copy of its home tensors); a no-op if it is there."""
        if name in self.resident:
            return
        self._point(self._home[name], lambda t: t.to(self.device, non_blocking=self.pin_memory))
        self.resident.append(name)
        self.moves += 1

    def unload(self, name: str) -> None:
        """Point part `name` back at its home tensors, freeing its device copies."""
        if name not in self.resident:
            return
        self._point(self._home[name], lambda t: t)
        self.resident.remove(name)
        _drop_device_caches(getattr(self.model, name))

    @contextmanager
    def use(self, *names: str) -> Iterator[None]:
        """Run the block with `names` on the device and every other part in CPU memory."""
        for other in [n for n in self.resident if n not in names]:
            self.unload(other)
        for name in names:
            self.load(name)
        try:
            yield
        finally:
            for name in names:
                self.unload(name)

    def remove(self) -> None:
        """Put every part back on the device for good (undo the offload)."""
        for name in PARTS:
            self.load(name)
        self.resident.clear()


def _drop_device_caches(part: nn.Module) -> None:
    """Forget weight copies a part keeps beside its parameters (the DiT's fused projections)."""
    for block in getattr(part, "layers", []):
        if getattr(block, "_fused", None) is not None:
            block._fused = ((), None, None)
