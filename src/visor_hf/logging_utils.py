"""visor_hf's loggers follow transformers' verbosity (`transformers.logging.set_verbosity_error()` silences them)."""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging


class _TransformersVerbosity(logging.Filter):
    """Let a record through only at or above the verbosity set with `transformers.logging.set_verbosity_*`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= hf_logging.get_verbosity()


_FILTER = _TransformersVerbosity()


def get_logger(name: str) -> logging.Logger:
    """The logger `name`, filtered by transformers' verbosity (default: warnings and errors)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
