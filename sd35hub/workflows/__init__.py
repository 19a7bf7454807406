"""Workflows that compose the library: the memory plan (plan.py, sizes.py), training on Hugging Face Jobs (jobs.py,
job_status.py), hyperparameter sweeps (sweep.py), the offline demo (demo.py). Nothing heavy is imported here."""
