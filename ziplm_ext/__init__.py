"""ziplm_ext: inference-aware structured pruning (ZipLM) of transformer language models."""
__version__ = "0.1.0"
