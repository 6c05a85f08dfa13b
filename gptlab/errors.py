"""Errors that reach the user as a short message instead of a traceback."""


class GptlabError(Exception):
    """A problem with the user's input (config, data, checkpoint, prompt) that they can fix."""


class ConfigError(GptlabError, ValueError):
    """A configuration value is invalid."""


class DataError(GptlabError):
    """The corpus or its prepared cache cannot be used."""


class CheckpointError(GptlabError):
    """A checkpoint is missing, unreadable, unsafe or does not fit."""
