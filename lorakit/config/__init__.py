"""The recipe: its schema (the only home of defaults), loading, --set overrides, reference docs, init templates.

May import only the bottom layer (lorakit.errors, console, atomic, paths, compat, faults).
"""
