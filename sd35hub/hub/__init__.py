"""The Hub: find and fetch adapters (discovery.py), publish a run as one commit (publish.py, publish_checks.py),
the model card (card.py, the only card writer; its template is templates/model_card.md). Everything goes through
huggingface_hub; the access checks (license, token) are sd35hub.access, one layer below. Nothing heavy is
imported here; import the submodules you need."""
