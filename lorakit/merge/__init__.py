"""`lorakit merge`: folding an adapter into its base weights, streamed shard by shard, and verifying the result.

May import lorakit.adapters, models, data (stop tokens), config and the bottom layer.
"""
