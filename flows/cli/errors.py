"""The errors a `sngp` command reports as one line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment: reported as one clear line, exit code 2."""


class RunFailed(Exception):
    """A run ended by something outside the code (a server away for longer than --server-grace, a
    full disk): reported as one clear line, exit code 1."""


class FlowFailed(Exception):
    """A flow run that failed (a task's error, a bad flow parameter): its one line, already worded by
    the command (`sngp run: pipeline failed: ValueError: ...`), exit code 1, also with --debug (Prefect
    has logged the traceback)."""


class ServerUnavailable(RunFailed):
    """The MLflow tracking server or the Prefect server stopped answering for longer than
    --server-grace."""
