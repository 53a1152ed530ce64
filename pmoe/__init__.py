"""pmoe: patch-level routed Mixture-of-Experts layers for CNNs (Chowdhury et al., ICML 2023).

    layer = pmoe.PMoEConv2d(in_channels, out_channels, patch_size, num_experts, top_l)
    y, routing = layer(x, return_routing=True)

See docs/SPEC.md for exactly what the layer computes.
"""
from . import functional
from .functional import pmoe_conv2d, pmoe_conv2d_pooled, triton_available
from .hierarchical import HierarchicalPMoE, HierarchicalRouting
from .layers import PMoE, PMoEConv2d
from .routing import Routing

__all__ = ["PMoEConv2d", "PMoE", "HierarchicalPMoE", "HierarchicalRouting", "Routing", "functional", "pmoe_conv2d",
           "pmoe_conv2d_pooled", "triton_available"]
__version__ = "0.1.0"
