REQUIRED = object()  # the default of a config key that has none


class UserError(Exception):
    """A mistake in the user's input (config, command line, data files, checkpoint).

    train.py and test.py print it as one line, without a traceback, and exit with status 2.
    """


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class DataError(UserError):
    pass


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss is no longer finite); printed as one line, exit status 1."""
