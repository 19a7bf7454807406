"""Workflows that compose the library: the memory plan (plan.py), training on Hugging Face Jobs (jobs.py, job_status.py), checkpoints
that survive a job (resume.py), hyperparameter sweeps (sweep.py). Nothing heavy is imported here."""
