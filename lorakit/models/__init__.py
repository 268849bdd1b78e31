"""Base models: sources (hub, local dir, GGUF), loading and quantization, layer discovery, meta-device builds,
and the per-example attention that keeps flattened examples apart on sdpa and eager (attention).

May import lorakit.config and the bottom layer.
"""
