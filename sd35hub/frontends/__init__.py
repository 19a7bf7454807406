"""The front ends: the CLI (cli.py and commands/), the Colab notebook's helpers (colab.py, colab_tools.py) and
the Space's helpers (space/). They word errors for their audience and call the library; the orchestration they
share lives in sd35hub.workflows. Nothing heavy is imported here."""
