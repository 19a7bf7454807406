"""The Space's helpers (the Streamlit pages are space/app.py and space/train_page.py at the repo root): bases and
limits (support.py), the page's state (view.py), visitor-facing text (text.py), the bundled sample adapters
(samples.py), start-up (start.py), training as a Job (training.py). Nothing heavy is imported here."""
