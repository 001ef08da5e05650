"""The SDXL decoder's fast paths (blip3o.accel.decoder) on a CPU: same images as the plain decode.

CUDA graphs cannot be captured on a CPU; `EagerCall` stands in for them, so the static-buffer,
cache-key and recapture logic runs here.
"""

import pytest
import torch

from blip3o import Blip3o
from blip3o.accel import DecoderLoopGraph, EagerCall, UNetStepGraph


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Blip3o.from_preset("debug")
    with torch.no_grad():
        for p in m.dit.parameters():  # open the zero-initialised gates: every branch of the DiT counts
            if not p.any():
                p.normal_(0, 0.02)
    return m


def test_unet_step_graph_and_channels_last_match_plain_decode(model):
    decoder = model.decoder
    tokens = torch.randn(2, 64, decoder.token_width, generator=torch.Generator().manual_seed(1))
    want = decoder.decode(tokens, generator=torch.Generator().manual_seed(0))
    graphed = UNetStepGraph(decoder, graph=EagerCall)
    decoder.set_channels_last(True)
    decoder.fast_predict = graphed
    try:
        got = decoder.decode(tokens, generator=torch.Generator().manual_seed(0))
        assert len(graphed._graphs) == 1  # one shape over all steps: captured once, replayed
        decoder.fast_predict = UNetStepGraph(decoder)  # CPU default: the eager call
        eager = decoder.decode(tokens, generator=torch.Generator().manual_seed(0))
    finally:
        decoder.fast_predict = None
        decoder.set_channels_last(False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager, want, rtol=1e-4, atol=1e-5)
    assert decoder.unet.conv_in.weight.is_contiguous()


def test_decoder_loop_graph_logic_equals_plain_decode(model):
    decoder = model.decoder
    assert decoder.scheduler_config["_class_name"] == "EulerDiscreteScheduler"  # the official schedule
    loop = DecoderLoopGraph(decoder, graph=EagerCall)
    decoder.fast_loop = loop
    try:
        for seed, batch, guidance in ((1, 2, 3.0), (2, 2, 3.0), (3, 1, 1.0)):
            tokens = torch.randn(batch, 64, decoder.token_width, generator=torch.Generator().manual_seed(seed))
            negative = torch.randn(1, 64, decoder.token_width, generator=torch.Generator().manual_seed(9))
            got = decoder.decode(tokens, negative=negative, guidance=guidance,
                                 generator=torch.Generator().manual_seed(0))
            decoder.fast_loop = None
            want = decoder.decode(tokens, negative=negative, guidance=guidance,
                                  generator=torch.Generator().manual_seed(0))
            decoder.fast_loop = loop
            # the same kernels on the same values: the captured loop reads new inputs from its static buffers
            assert torch.equal(got, want), seed
        assert len(loop._graphs) == 2  # the second call replayed the first capture; guidance 1 is its own
        decoder.fast_loop = DecoderLoopGraph(decoder)  # CPU default: the eager loop
        eager = decoder.decode(tokens, guidance=1.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(eager, want)
    finally:
        decoder.fast_loop = None
    assert DecoderLoopGraph.supports({"_class_name": "EulerDiscreteScheduler"})
    assert not DecoderLoopGraph.supports({"_class_name": "EulerAncestralDiscreteScheduler"})  # draws noise


def test_decoder_loop_graph_is_not_used_for_other_schedulers(model):
    decoder = model.decoder
    config = decoder.scheduler_config
    decoder.scheduler_config = {**config, "_class_name": "DDIMScheduler"}
    calls = []

    class Spy(DecoderLoopGraph):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    decoder.fast_loop = Spy(decoder, graph=EagerCall)
    try:
        tokens = torch.randn(1, 64, decoder.token_width, generator=torch.Generator().manual_seed(1))
        got = decoder.decode(tokens, generator=torch.Generator().manual_seed(0))
        decoder.fast_loop = None
        want = decoder.decode(tokens, generator=torch.Generator().manual_seed(0))
    finally:
        decoder.fast_loop = None
        decoder.scheduler_config = config
    assert not calls and torch.equal(got, want)
