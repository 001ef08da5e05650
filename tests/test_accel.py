"""The fast paths (blip3o.accel) and offload (blip3o.offload) on a CPU: same answers as the plain code.

CUDA graphs cannot be captured on a CPU; `EagerCall` stands in for them, so the static-buffer,
cache-key and recapture logic runs here, and the GPU benchmark (benchmarks/gpu_all.sh) checks the
real graphs against the eager loop on the device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.accel import (
    DecoderLoopGraph,
    DiTLoopGraph,
    EagerCall,
    disable_static_cache,
    enable_static_cache,
)
from blip3o.sampling import run_dit_loop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Blip3o.from_preset("debug")
    with torch.no_grad():
        for p in m.dit.parameters():  # open the zero-initialised gates: every branch of the DiT counts
            if not p.any():
                p.normal_(0, 0.02)
    return m


def sample_with(model, loop, cond, **kwargs):
    """model.sample_tokens with `loop` running the DiT's sampling loop."""
    saved, model.dit_loop = model.dit_loop, loop
    try:
        return model.sample_tokens(cond, **kwargs)
    finally:
        model.dit_loop = saved


def _cond(model, batch=2):
    return torch.randn(batch, 64, model.config.backbone.hidden_size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_dit_loop_graph_eager_fallback_equals_sample_tokens(model, guidance):
    cond = _cond(model)
    want = model.sample_tokens(cond, guidance=guidance, generator=torch.Generator().manual_seed(0))
    got = sample_with(
        model, DiTLoopGraph(model.dit), cond, guidance=guidance, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(got, want)


def test_dit_loop_graph_graph_logic_equals_sample_tokens(model):
    sampler = DiTLoopGraph(model.dit, graph=EagerCall)
    for seed in (0, 1):  # the second call replays the captured loop with new static inputs
        cond = _cond(model, batch=1 + seed)
        want = model.sample_tokens(cond, generator=torch.Generator().manual_seed(seed))
        got = sample_with(model, sampler, cond, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)
    assert len(sampler._graphs) == 2  # one capture per shape
    cond = _cond(model, batch=1)
    sample_with(model, sampler, cond, steps=3, generator=torch.Generator().manual_seed(0))
    assert len(sampler._graphs) == 3  # and per setting


def test_stochastic_sampler_is_seeded_and_the_graph_logic_replays_it(model):
    import dataclasses

    cond, config = _cond(model), model.config
    try:
        model.config = dataclasses.replace(config, sampler="stochastic", eta=1.0)
        first = model.sample_tokens(cond, generator=torch.Generator().manual_seed(0))
        assert torch.equal(first, model.sample_tokens(cond, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(first, model.sample_tokens(cond, generator=torch.Generator().manual_seed(1)))
        # fresh noise is drawn after the start noise: same start as Euler, another path
        euler = model.sample_tokens(cond, generator=torch.Generator().manual_seed(0), sampler="euler")
        assert not torch.allclose(first, euler)
        sampler = DiTLoopGraph(model.dit, graph=EagerCall)
        for seed in (0, 1):  # the second call replays the captured loop with new noise
            want = model.sample_tokens(cond, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(sample_with(model, sampler, cond, generator=torch.Generator().manual_seed(seed)), want)
        assert len(sampler._graphs) == 1
        model.config = dataclasses.replace(config, sampler="stochastic", eta=0.0)
        assert torch.equal(model.sample_tokens(cond, generator=torch.Generator().manual_seed(0)), euler)
    finally:
        model.config = config


def test_dit_loop_graph_graph_logic_with_self_conditioning_equals_sample_tokens():
    import dataclasses

    from blip3o.dit import DiT

    torch.manual_seed(0)
    m = Blip3o.from_preset("debug")
    m.config.dit = dataclasses.replace(m.config.dit, self_condition=True)
    m.dit = DiT(m.config.dit)
    with torch.no_grad():
        for p in m.dit.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    sampler = DiTLoopGraph(m.dit, graph=EagerCall)
    for seed in (0, 1):  # each replay starts its estimate from zeros again
        cond = _cond(m)
        want = m.sample_tokens(cond, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_with(m, sampler, cond, generator=torch.Generator().manual_seed(seed)), want)


def test_dit_loop_graph_recaptures_when_weights_change(model):
    sampler = DiTLoopGraph(model.dit, graph=EagerCall)
    cond = _cond(model, batch=1)
    sample_with(model, sampler, cond, generator=torch.Generator().manual_seed(0))
    first = next(iter(sampler._graphs.values()))
    weight = model.dit.layers[0].feed_forward.linear_2.weight
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        got = sample_with(model, sampler, cond, generator=torch.Generator().manual_seed(0))
        want = model.sample_tokens(cond, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, want) and next(iter(sampler._graphs.values())) is not first
    finally:
        with torch.no_grad():
            weight.div_(1.5)


def test_fused_dit_sampler_matches_within_rounding(model):
    cond = _cond(model, batch=1)
    want = model.sample_tokens(cond, generator=torch.Generator().manual_seed(0))
    model.dit.fuse_projections(True)
    try:
        got = sample_with(
            model, DiTLoopGraph(model.dit, graph=EagerCall), cond, generator=torch.Generator().manual_seed(0)
        )
    finally:
        model.dit.fuse_projections(False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_accelerate_on_cpu_generates_the_same_images(model):
    want = model.generate(["a red circle"], seed=0)
    model.accelerate(compile=False)
    try:
        got = model.generate(["a red circle"], seed=0)
        # on a CPU one wide GEMM is no faster (docs/benchmarks.md): the projections stay apart
        assert all(block._fused is None for block in model.dit.layers)
        assert isinstance(model.dit_loop, DiTLoopGraph)
        assert isinstance(model.decoder.sampling_loop, DecoderLoopGraph) and model.decoder.channels_last
    finally:
        model.dit_loop = run_dit_loop
        model.decoder.unet_call, model.decoder.sampling_loop = model.decoder.unet_output, model.decoder.denoise
        model.decoder.set_channels_last(False)
        model.dit.fuse_projections(False)
        disable_static_cache(model.backbone)
    diff = [abs(a - b) for x, y in zip(want, got, strict=True) for a, b in zip(x.tobytes(), y.tobytes(), strict=True)]
    assert max(diff) <= 1  # NHWC and the modulations' GEMM change float rounding, not the image


def test_static_cache_answer_runs(model):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    want = model.answer([image, None], ["what is this?", "and this?"], max_new_tokens=6)
    enable_static_cache(model.backbone, compile=False)
    try:
        got = model.answer([image, None], ["what is this?", "and this?"], max_new_tokens=6)
    finally:
        disable_static_cache(model.backbone)
    assert got == want


def test_offload_runs_each_part_alone_and_gives_the_same_images(model):
    want = model.generate(["a red circle"], seed=0)
    seen = []
    hooks = [
        model.dit.patch_embedder.proj.register_forward_pre_hook(
            lambda m, a: seen.append(("dit", tuple(model._offload.resident)))
        )
    ]
    hooks += [
        model.backbone.model.model.language_model.register_forward_pre_hook(
            lambda m, a: seen.append(("backbone", tuple(model._offload.resident)))
        )
    ]
    hooks += [
        model.decoder.unet.register_forward_pre_hook(
            lambda m, a: seen.append(("decoder", tuple(model._offload.resident)))
        )
    ]
    model._negative = None
    model.enable_offload("cpu")
    try:
        got = model.generate(["a red circle"], seed=0)
        assert model._offload.resident == [] and model._offload.moves >= 3
    finally:
        model.disable_offload()
        for h in hooks:
            h.remove()
    assert [a.tobytes() for a in got] == [b.tobytes() for b in want]
    assert seen and all(resident == (part,) for part, resident in seen)
    assert {part for part, _ in seen} == {"backbone", "dit", "decoder"}


def test_offload_points_weights_at_home_copies_between_uses(model):
    from blip3o.offload import Offload

    offload = Offload(model, "cpu")
    weight = model.dit.patch_embedder.proj.weight
    home = weight.data_ptr()
    moved = []
    real = torch.Tensor.to

    def tracking_to(self, *args, **kwargs):  # a stand-in "device": record what is copied where
        out = real(self, *args, **kwargs)
        if self.data_ptr() == home:
            moved.append(out)
        return out

    torch.Tensor.to = tracking_to
    try:
        with offload.use("dit"):
            assert offload.resident == ["dit"] and moved
        assert weight.data_ptr() == home and offload.resident == []
    finally:
        torch.Tensor.to = real
        offload.remove()


@pytest.mark.parametrize("script", ["generation", "understanding", "train_stage2"])
def test_benchmark_runs_at_debug_size(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "USE_FLAX": "0"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--preset", "debug"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "device:" in out.stdout and "ratio" in out.stdout, out.stdout
