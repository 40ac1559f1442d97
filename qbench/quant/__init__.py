"""Fake-quantization primitives shared by every quantizer plugin (see ../shared/specs/quantizers.md)."""
