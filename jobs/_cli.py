"""What every job's command line shares: one-line errors and the scale/storage-option types."""
from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, no usage block: job errors are read in logs."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def scales(text: str) -> tuple[int, ...]:
    """'180,270,400' -> (180, 270, 400): inference short sides in pixels."""
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated short sides, e.g. 180,270,400")
    return values


def storage_options(text: str) -> dict[str, Any]:
    """fsspec options as a JSON object, e.g. '{"anon": true}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value
