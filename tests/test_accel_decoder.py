"""The SDXL decoder's fast paths (blip3o.accel.decoder) on a CPU: same images as the plain decode.

CUDA graphs cannot be captured on a CPU; `EagerCall` stands in for them, so the static-buffer,
cache-key and recapture logic runs here.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from blip3o import Blip3o
from blip3o.accel import DecoderLoopGraph, EagerCall, UNetStepGraph


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug")  # the decoder's fast paths read the decoder alone


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def sampling_with(decoder, *, unet_call=None, sampling_loop=None) -> Iterator[None]:
    """Run `decoder.decode` through the given UNet call and loop, then back to the eager ones."""
    decoder.unet_call = unet_call or decoder.unet_output
    decoder.sampling_loop = sampling_loop or decoder.denoise
    try:
        yield
    finally:
        decoder.unet_call, decoder.sampling_loop = decoder.unet_output, decoder.denoise


def test_the_decoder_samples_eagerly_by_default(model):
    decoder = model.decoder
    assert decoder.unet_call == decoder.unet_output and decoder.sampling_loop == decoder.denoise


def test_unet_step_graph_and_channels_last_match_plain_decode(model):
    decoder = model.decoder
    tokens = torch.randn(2, 64, decoder.token_width, generator=seeded(1))
    want = decoder.decode(tokens, generator=seeded(0))
    graphed = UNetStepGraph(decoder, graph=EagerCall)
    decoder.set_channels_last(True)
    try:
        with sampling_with(decoder, unet_call=graphed):
            got = decoder.decode(tokens, generator=seeded(0))
        assert len(graphed._graphs) == 1  # one shape over all steps: captured once, replayed
        with sampling_with(decoder, unet_call=UNetStepGraph(decoder)):  # CPU default: the eager call
            eager = decoder.decode(tokens, generator=seeded(0))
    finally:
        decoder.set_channels_last(False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager, want, rtol=1e-4, atol=1e-5)
    assert decoder.unet.conv_in.weight.is_contiguous()


def test_unet_step_graph_is_exactly_the_eager_unet_call(model):
    decoder = model.decoder
    x = torch.randn(4, 4, 16, 16, generator=seeded(2))
    tokens = torch.randn(4, 64, decoder.token_width, generator=seeded(3))
    t = torch.tensor(500)
    with torch.no_grad():
        want = decoder.unet_output(x, t, tokens)
        graphed = UNetStepGraph(decoder, graph=EagerCall)
        graphed(x + 1, t, tokens)  # captured on other values: the replay must read the new ones
        assert torch.equal(graphed(x, t, tokens), want)
        wide = torch.randn(4, 4, 12, 20, generator=seeded(4))  # another shape: its own graph, its own time ids
        assert torch.equal(graphed(wide, t, tokens), decoder.unet_output(wide, t, tokens))
        assert len(graphed._graphs) == 2


def test_decoder_loop_graph_logic_equals_plain_decode(model):
    decoder = model.decoder
    assert decoder.scheduler_config["_class_name"] == "EulerDiscreteScheduler"  # the official schedule
    loop = DecoderLoopGraph(decoder, graph=EagerCall)
    negative = torch.randn(1, 64, decoder.token_width, generator=seeded(9))
    for seed, batch, guidance, height in ((1, 2, 3.0, 32), (2, 2, 3.0, 32), (4, 1, 3.0, 56), (3, 1, 1.0, 32)):
        tokens = torch.randn(batch, 64, decoder.token_width, generator=seeded(seed))
        size = dict(height=height, width=32)
        with sampling_with(decoder, sampling_loop=loop):
            got = decoder.decode(tokens, negative=negative, guidance=guidance, generator=seeded(0), **size)
        want = decoder.decode(tokens, negative=negative, guidance=guidance, generator=seeded(0), **size)
        # the same kernels on the same values: the captured loop reads new inputs from its static buffers
        assert torch.equal(got, want), seed
        assert got.shape == (batch, 3, height, 32)
    # the second call replayed the first capture; guidance 1 and the 56 x 32 image are their own
    assert len(loop._graphs) == 3
    with sampling_with(decoder, sampling_loop=DecoderLoopGraph(decoder)):  # CPU default: the eager loop
        eager = decoder.decode(tokens, guidance=1.0, generator=seeded(0))
    assert torch.equal(eager, want)
    assert DecoderLoopGraph.supports({"_class_name": "EulerDiscreteScheduler"})
    assert not DecoderLoopGraph.supports({"_class_name": "EulerAncestralDiscreteScheduler"})  # draws noise


def test_decoder_loop_graph_captures_the_decoders_own_loop(model):
    decoder = model.decoder
    unet_steps = []

    def denoise(*args, **kwargs):
        unet_steps.append(args[4] if len(args) > 4 else kwargs.get("unet_step"))
        return type(decoder).denoise(decoder, *args, **kwargs)

    decoder.denoise = denoise  # an instance attribute shadows the method: a spy on every loop run
    try:
        loop = DecoderLoopGraph(decoder, graph=EagerCall)
        tokens = torch.randn(1, 64, decoder.token_width, generator=seeded(4))
        with sampling_with(decoder, sampling_loop=loop):
            decoder.decode(tokens, steps=2, generator=seeded(0))
    finally:
        del decoder.denoise
        decoder.sampling_loop = decoder.denoise
    # EagerCall runs the loop once to capture and once to replay: both through `denoise`, with the graph's step
    assert len(unet_steps) == 2 and all(callable(step) for step in unet_steps)


def test_decoder_loop_graph_runs_other_schedulers_eagerly(model):
    decoder = model.decoder
    config = decoder.scheduler_config
    decoder.scheduler_config = {**config, "_class_name": "EulerAncestralDiscreteScheduler"}  # draws noise per step
    loop = DecoderLoopGraph(decoder, graph=EagerCall)
    try:
        tokens = torch.randn(2, 64, decoder.token_width, generator=seeded(1))
        with sampling_with(decoder, sampling_loop=loop):
            got = decoder.decode(tokens, generator=[seeded(0), seeded(1)])
        want = decoder.decode(tokens, generator=[seeded(0), seeded(1)])
        other = decoder.decode(tokens, generator=[seeded(0), seeded(2)])
    finally:
        decoder.scheduler_config = config
    assert not loop._graphs  # nothing captured
    assert torch.equal(got, want)  # the step noise came from the same generators
    assert torch.equal(got[0], other[0]) and not torch.equal(got[1], other[1])  # one generator per row
