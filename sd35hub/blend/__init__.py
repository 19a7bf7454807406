"""Generation with N adapters on one base: the engine (engine.py: load once, set weights, LRU), the request and
its ``<lora:owner/repo:0.8>`` prompt syntax (request.py), schedulers (schedulers.py), merging adapters into one
file (merge.py). Nothing heavy is imported here; import the submodules you need."""
