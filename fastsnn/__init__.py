"""fastsnn: fused Triton kernels and a training program for spiking neural networks (SNNs) distilled
from ANN teachers with the TSER loss."""
from .neuron import BNIF, BNLIF, BNPLIF, IF, LIF, PLIF, BNNeuron, MultistepNeuron, SyncBatchNorm, convert_sync_bn
from .loss import TSERLoss
from .ops.bn_lif import bn_if, bn_lif, bn_plif
from .ops.lif import if_multistep, lif_multistep, plif_multistep
from .spike_layers import SpikeConv2d, SpikeMaxPool2d
from .ops.tser_loss import tser_loss
from .spec import NeuronSpec

__version__ = "0.1.0"


def __getattr__(name):
    # the SpikingJelly adapter sits at the edge: loaded on first use, never by the core
    if name in ("convert_spikingjelly", "neuron_from_spikingjelly"):
        from . import interop

        return getattr(interop, name)
    raise AttributeError(f"module 'fastsnn' has no attribute {name!r}")


__all__ = ["lif_multistep", "if_multistep", "plif_multistep", "LIF", "IF", "PLIF", "MultistepNeuron", "bn_lif", "bn_if",
           "bn_plif", "BNLIF", "BNIF", "BNPLIF", "BNNeuron", "SpikeConv2d", "SpikeMaxPool2d", "NeuronSpec", "tser_loss",
           "TSERLoss",
           "convert_spikingjelly", "neuron_from_spikingjelly", "convert_sync_bn", "SyncBatchNorm"]
