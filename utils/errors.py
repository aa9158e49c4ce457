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
