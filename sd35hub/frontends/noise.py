"""What the front ends print besides their own lines: third-party import noise off, debug output redacted.

Importing diffusers with torchao installed logs lines that say nothing to a user of sd35hub
("Failed to load .../torchao/_C_mxfp8...so", torch's pytree deprecation for torchao's enums, "Unable to
import `torchao` Tensor objects", transformers' torchvision fallback). :func:`quiet_library_noise` sets
those loggers to ERROR (real errors still show); with ``SD35HUB_DEBUG=1`` they stay on, and
:func:`install_debug_output` routes logging, uncaught exceptions and thread crashes through the token
redactor instead.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

# Loggers that only ever speak at import time about optional native kernels / deprecations of other libraries.
NOISY_IMPORT_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "transformers.utils.import_utils",
)


def quiet_library_noise() -> None:
    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _RedactingFormatter(logging.Formatter):
    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def install_debug_output(redact: Callable[[str], str]) -> None:
    """SD35HUB_DEBUG: sd35hub's debug log on stderr, everything (logs, tracebacks) through ``redact``."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, _RedactingFormatter) for h in root.handlers):
        return  # main() called again in this process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(redact))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("sd35hub").setLevel(logging.DEBUG)

    def _excepthook(kind: type[BaseException], exc: BaseException, tb: object) -> None:
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))  # type: ignore[arg-type]

    def _thread_hook(args: threading.ExceptHookArgs) -> None:
        _excepthook(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)

    sys.excepthook = _excepthook
    threading.excepthook = _thread_hook
