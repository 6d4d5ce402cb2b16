"""fastsnn: fused Triton kernels and a training program for spiking neural networks (SNNs) distilled
from ANN teachers with the TSER loss."""
from .neuron import IF, LIF
from .interop import convert_spikingjelly
from .loss import TSERLoss
from .ops.lif import if_multistep, lif_multistep
from .ops.tser_loss import tser_loss

__version__ = "0.1.0"

__all__ = ["lif_multistep", "if_multistep", "LIF", "IF", "tser_loss", "TSERLoss", "convert_spikingjelly"]
