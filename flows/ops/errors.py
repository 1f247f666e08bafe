"""The one error type of flows/ops."""


class ServiceError(Exception):
    """A service cannot start or run as asked (port taken, bad database URL, server exited): the CLI
    prints it as one line and exits 2."""
