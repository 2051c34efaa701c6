"""How much schce says: ``schce.settings.verbosity`` and the handler that shows schce's messages in notebooks."""

from __future__ import annotations

import logging

_LOGGER = "schce"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _UnlessConfigured(logging.StreamHandler):
    """Print schce's records to stderr only while the root logger has no handler.

    A script or the CLI that configures ``logging`` (``logging.basicConfig``), and pytest's capture, receive the
    records through the root logger instead, so nothing is printed twice.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


class Settings:
    """schce's settings: ``schce.settings.verbosity``.

    Examples
    --------
    >>> schce.settings.verbosity = "warning"  # only warnings and errors
    >>> schce.settings.verbosity = "info"  # the default: input type detected, epoch kept, calibration, ...
    """

    @property
    def verbosity(self) -> str:
        """Level of the ``"schce"`` logger: ``"debug"``, ``"info"`` (default), ``"warning"`` or ``"error"``.

        The same as ``logging.getLogger("schce").setLevel(...)``; an int logging level is accepted too.
        """
        level = logging.getLogger(_LOGGER).getEffectiveLevel()
        return next((name for name, value in _LEVELS.items() if value == level), logging.getLevelName(level).lower())

    @verbosity.setter
    def verbosity(self, value: str | int) -> None:
        if isinstance(value, str) and value.lower() in _LEVELS:
            level = _LEVELS[value.lower()]
        elif isinstance(value, int) and not isinstance(value, bool):
            level = value
        else:
            raise ValueError(f"verbosity must be one of {list(_LEVELS)} or a logging level (int), got {value!r}.")
        logging.getLogger(_LOGGER).setLevel(level)

    def __repr__(self) -> str:
        return f"schce.settings(verbosity={self.verbosity!r})"


def install_handler() -> None:
    """Give the ``"schce"`` logger its notebook handler (once) and the INFO level unless a level was set."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(h, _UnlessConfigured) for h in logger.handlers):
        handler = _UnlessConfigured()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


settings = Settings()
