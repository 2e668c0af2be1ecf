"""Errors a user can cause: the CLI prints their message as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input, files or settings; the message says what and how to fix."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, or not the kind that was asked for."""


class BackendUnavailable(UserError):
    """An explicitly requested backend or loader cannot run here."""
