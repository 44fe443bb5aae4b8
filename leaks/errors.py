"""Errors of the leak sources."""
from invbench.errors import InvbenchError


class ModelLoadError(InvbenchError, RuntimeError):
    """A model could not be loaded; the message says which and why."""
