"""The data pipeline: sources -> samples -> aspect buckets -> latent/embedding cache -> batches.

Import the submodules directly (``sd35hub.data.sources``, ``.buckets``, ``.cache``, ``.preview``,
``.sample``); this package imports nothing heavy.
"""
