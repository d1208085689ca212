"""Log set-up for `serve`: level, text or JSON lines, stderr and optionally a file.

The file handler reopens its file when it was renamed or removed (newsyslog,
logrotate), so rotation needs no signal. stderr gets the same lines as the file
unless `stderr_level` says otherwise: the LaunchAgent sets warning, since under
launchd stderr is itself a file nothing reopens.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in self._STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(
    level: str, fmt: str, log_file: str, text_format: str = TEXT_FORMAT, stderr_level: str = ""
) -> None:
    """Lines at `level` and above to stderr and `log_file`; stderr alone can be raised to `stderr_level`."""
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(text_format)
    stderr = logging.StreamHandler(sys.stderr)
    if stderr_level:
        stderr.setLevel(stderr_level.upper())
    handlers: list[logging.Handler] = [stderr]
    if log_file:
        handlers.append(logging.handlers.WatchedFileHandler(log_file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
