"""Exporters of pruned models to the formats deployment engines load (GGUF, ONNX, self-contained HF directories)."""
