"""Base models: the embedded tiny SD3.5 (`tiny`) and the one loading path for every model source.

Nothing heavy is imported here; `sd35hub.models.load` and `sd35hub.models.tiny` import torch and
diffusers inside their functions.
"""
