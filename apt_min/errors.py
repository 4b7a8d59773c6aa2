"""Errors about the user's files and settings, told apart from bugs.

Every error this package raises about something a user gave it (a data file, an audio clip, a checkpoint, a setting)
is a `UserError`, and its message names the file or setting and what is wrong. The entry points (`train.py`,
`evaluate.py`, `python -m apt_min ask`) print such a message alone and exit with a non-zero status; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools


class UserError(Exception):
    """Something the user gave cannot be used as it is; the message says which and why."""


class SettingError(UserError, ValueError):
    """A preset or setting that does not exist or does not parse, or settings that contradict each other."""


class MissingFileError(UserError, FileNotFoundError):
    """A file that the settings, the data layout or a list name is not on disk (a run's LLM, encoder or tokenizer not
    made yet, a listed clip)."""


class ForeignDataError(UserError, FileExistsError):
    """A folder holds data this package did not write (a real data set, say), which it must never replace."""


def clean_exit(program: str):
    """A decorator for an entry point's main: a UserError becomes SystemExit with its message, which Python prints
    on stderr, alone, exiting with status 1; every other exception propagates unchanged, traceback and all."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as e:
                raise SystemExit(f"{program}: error: {e}") from None
        return run
    return wrap


def whole_number(least: int):
    """An argparse type: a whole number of at least `least`, else argparse's own error naming the option."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}")
        return int(text)
    parse.__name__ = f"whole number >= {least}"
    return parse
