"""Adapter files: save/load with metadata, pick the adapter file of a repo (files.py), detect and convert
formats (formats.py with formats_keys / formats_mmdit / formats_values), check an adapter against a base model
(check.py, check_te.py). This package imports nothing heavy; import the submodules you need."""
