"""qbench: measure what quantization does to vision-language models beyond accuracy."""

__version__ = "0.1.0"
