"""What every job's command line shares: one parser style (defaults shown, no abbreviations,
one-line errors), the output flag, comma-separated lists, and library errors in flag names.

    p = make_parser("ifcn-report", __doc__)
    add_output(p, "the job's output folder")
    args = p.parse_args(argv); output = output_of(p, args)
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from typing import Any, Callable, Iterable, NoReturn

INTERRUPTED = 130  # what a shell reports for a job ended by SIGINT
RESUME = "committed rows are kept, re-run the same command to resume"  # jobs that commit as they go


def interruptible(prog: str, then: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Ctrl-C ends the job with one line (`<prog>: interrupted; <then>`) and exit 130, not a
    KeyboardInterrupt traceback: `then` tells the user what was kept and how to go on."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                stop_ray()
                print(f"{prog}: interrupted; {then}", file=sys.stderr)
                return INTERRUPTED
        return run
    return wrap


def stop_ray() -> None:
    """Disconnects from Ray (stopping a local one) after Ctrl-C, before the job's last line: Ray's
    workers got the SIGINT too, and their dying words (e.g. `(pid=...) Exception ignored in:
    'ray._raylet.call_actor_shutdown'`) would otherwise be relayed after it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except BaseException:  # a second Ctrl-C, or Ray already half gone: exiting stops it anyway
            pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, no usage block: job errors are read in logs."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))  # as the flag takes it
    return str(value)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (examples keep their lines) and every option's default
    after its help, as the flag would take it (e.g. 119,178,267), unless it is None or False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action, "shown_default", action.default)
        if ("default" in text or not action.option_strings or action.required or default is None
                or default is False or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {_shown(default).replace('%', '%%')})"


def make_parser(prog: str, doc: str | None, **kwargs: Any) -> Parser:
    """The parser every job uses: its whole docstring as the description, defaults shown,
    allow_abbrev=False (`--scale 192` is an error, not `--scales 192`), one-line errors."""
    return Parser(prog=prog, description=doc, formatter_class=Formatter, allow_abbrev=False, **kwargs)


def show_defaults(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Shows library defaults in --help for flags whose parse default is SUPPRESS (only flags a user
    sets are forwarded, so the library's own defaults apply)."""
    for action in p._actions:
        if action.dest in defaults:
            action.shown_default = defaults[action.dest]  # type: ignore[attr-defined]


def add_output(p: argparse.ArgumentParser, help: str) -> None:
    """--output URL, the one way every job names its output folder; a positional URL still works
    (with a deprecation warning) for the jobs that took one."""
    p.add_argument("--output", help=help)
    p.add_argument("output_url", nargs="?", help=argparse.SUPPRESS)


def output_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    positional = getattr(args, "output_url", None)
    if positional and args.output and positional != args.output:
        p.error(f"two outputs given ({positional} and --output {args.output}); pass only --output")
    if positional and not args.output:
        print(f"{p.prog}: warning: a positional output is deprecated; pass --output {positional}", file=sys.stderr)
    output = args.output or positional
    if not output:
        p.error("the following arguments are required: --output")
    return output


def int_list(text: str, what: str = "integers", example: str = "180,270,400") -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {what}, e.g. {example}")
    return values


def scales(text: str) -> tuple[int, ...]:
    """'180,270,400' -> (180, 270, 400): short sides in pixels."""
    return int_list(text, "short sides in pixels")


def storage_options(text: str) -> dict[str, Any]:
    """fsspec options as a JSON object, e.g. '{"anon": true}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


_FIELD = re.compile(r"\b[A-Z]\w*Config\.(\w+)=")
_BARE = re.compile(r"\b[A-Z]\w*Config: ")


def in_flags(message: str, fields: Iterable[str]) -> str:
    """A library config error in the CLI's words: 'InferenceConfig.nms_iou=1.5: must be in (0, 1]'
    -> '--nms-iou 1.5: must be in (0, 1]'; field names that are flags become flags."""
    message = _FIELD.sub(lambda m: f"--{m.group(1).replace('_', '-')} ", message)
    message = _BARE.sub("", message)
    for name in sorted(fields, key=len, reverse=True):
        if "_" in name:
            message = re.sub(rf"(?<![-\w]){name}\b", "--" + name.replace("_", "-"), message)
    return message


def warn_scales(requested: tuple[int, ...], trained: Iterable[int] | None, log: Any = None) -> str | None:
    """The warning when inference scales lie outside the range the checkpoint was trained at (a model
    trained at 192-384 px sees different object sizes at 119 or 900), or None."""
    if not trained:
        return None
    trained = sorted(int(s) for s in trained)
    outside = [s for s in requested if s < trained[0] or s > trained[-1]]
    if not outside:
        return None
    text = (f"warning: --scales {_shown(requested)}: {_shown(outside)} outside the checkpoint's training scales "
            f"{_shown(trained)}; pass --scales within {trained[0]}-{trained[-1]} to match its training")
    (log or (lambda m: print(m, file=sys.stderr)))(text)
    return text


def trained_scales(url: str, storage_options: dict[str, Any] | None = None) -> list[int] | None:
    """The short sides a jobs.train checkpoint was trained at (its header only); None when it does not say."""
    from pipeline.report.build import peek_checkpoint

    return (peek_checkpoint(url, storage_options) or {}).get("trained_scales")
