"""Base models: sources (hub, local dir, GGUF), loading and quantization, layer discovery, meta-device builds.

May import lorakit.config and the bottom layer.
"""
