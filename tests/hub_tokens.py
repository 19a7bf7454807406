"""The local Hub test server's fixed tokens (known before it starts), importable by any test module.

Import them from here, not from ``conftest``: with tests/e2e/conftest.py also on the path, the module
named ``conftest`` is whichever was imported first, so importing them from ``conftest`` breaks in a full run.
"""

HUB_TOKEN = "hf_test_alice_write_0000000000000000"
HUB_READ_TOKEN = "hf_test_alice_read_00000000000000000"
HUB_OTHER_TOKEN = "hf_test_bob_write_000000000000000000"
HUB_ORG = "sd35hub-org"
