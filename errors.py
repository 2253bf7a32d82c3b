"""User mistakes end in one sentence and exit status 2, never in a traceback.

Code raises UserError where the user can fix the cause (a flag, a file, a row); each script's
entry point runs under `exit_on_user_error`, which prints the sentence and exits 2. Everything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the input the user gave: the message names the flag, file or row."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = str(err)
            if "Original Traceback" in message:
                # raised in a DataLoader worker, which wraps it in the worker's traceback: keep the sentence
                message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
            prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "error"
            print(f"{prog}: error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return wrapper
