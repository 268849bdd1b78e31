"""Adapter methods: the registry (PEFT config class, key defaults, mergeable, checkpoint layout, save/load),
building an adapter onto a base model, reading adapter folders, their model cards (README.md), and lorakit's
own bottleneck adapter.

May import lorakit.models, lorakit.config and the bottom layer.
"""
