"""Spikes stored as bits (SpikeConv2d's and SpikeMaxPool2d's saved input): fastsnn's pack and unpack kernels
against the same in PyTorch ops (eager) and torch.compile of them, on a spiking_resnet19 conv input
(T·B = 4·64 images of 128 channels at 32×32)."""
import pytest
import torch

from common import DEVICE, GPU_ROWS, fastsnn_path, run_benchmark, size
from fastsnn.ops import spike_storage

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHAPE = (256, 128, 32, 32)
TINY = (2, 3, 5, 7)
_compiled = {}


def _provider(provider, direction):
    torch_fn = spike_storage.pack_bits_torch if direction == "pack" else spike_storage.unpack_bits_torch
    if provider == "fastsnn":
        if direction == "pack":
            return (lambda flat, packed: spike_storage.pack("bench", flat, "bits", False)), fastsnn_path(DEVICE)
        return (lambda flat, packed: spike_storage.unpack("bench", packed, "bits",
                                                          ([flat.numel()], [1], flat.dtype))), fastsnn_path(DEVICE)
    if provider == "compile":
        key = direction
        if key not in _compiled:
            _compiled[key] = torch.compile(torch_fn, fullgraph=True)
        torch_fn, path = _compiled[key], "torch.compile"
    else:
        path = "eager"
    if direction == "pack":
        return (lambda flat, packed: torch_fn(flat)), path
    return (lambda flat, packed: torch_fn(packed, torch.empty_like(flat))), path


@pytest.mark.skipif(not GPU_ROWS, reason="GPU rows need CUDA (or FASTSNN_BENCH_DRY_RUN=1)")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("direction", ["pack", "unpack"])
@pytest.mark.parametrize("provider", ["fastsnn", "eager", "compile"])
def test_spike_pack(benchmark, copy_gbs, provider, direction, dtype):
    if DEVICE == "cpu" and dtype == "bf16":
        pytest.skip("the interpreter cannot do bf16 arithmetic")
    benchmark.group = f"spikes as bits {direction} {'x'.join(map(str, SHAPE))} {dtype}"
    flat = (torch.rand(size(SHAPE, TINY), device=DEVICE) < 0.2).to(DTYPES[dtype]).view(-1)
    packed = spike_storage.pack_bits_torch(flat)
    fn, path = _provider(provider, direction)
    # the spikes at full width once, and their bits once
    io_bytes = flat.numel() * flat.element_size() + packed.numel()
    run_benchmark(benchmark, lambda: fn(flat, packed), bytes_moved=io_bytes, copy_gbs=copy_gbs, path=path,
                  count_kernel_bytes=provider == "fastsnn", provider=provider, op="spike_pack", pass_=direction,
                  shape="x".join(map(str, SHAPE)), dtype=dtype)
