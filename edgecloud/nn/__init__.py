"""Quantized layers, exit heads and shared building blocks."""

from edgecloud.nn.quant import QuantConv2d, QuantLinear, quant_layers

__all__ = ["QuantConv2d", "QuantLinear", "quant_layers"]
