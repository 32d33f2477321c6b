"""The one exception type for bad user input: its message names the file, key or index."""


class InputError(ValueError):
    """Bad user input (config key, file, index, shape, element). The CLI prints it on one line."""
