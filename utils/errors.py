"""The errors a user can cause, and how the programs report them: one line, no traceback."""
import sys
import traceback

REQUIRED = object()  # the default of a config key that has none


class UserError(Exception):
    """A mistake in the user's input (config, command line, data files, checkpoint): exit status 2."""


class ConfigError(UserError):
    """A config file, an override or a command-line option that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found, loaded or resumed by this run."""


class DataError(UserError):
    """Data files missing or unreadable, or not the data a checkpoint was trained on."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss is no longer finite): exit status 1."""


def run_main(main, argv=None):
    """Call main(argv); print a UserError or TrainingError as 'error: ...' and exit 2 or 1; Ctrl-C
    outside training exits with 130; a bug prints its traceback and exits 1."""
    try:
        return main(argv)
    except (UserError, TrainingError) as e:
        text = " ".join(str(e).split())  # one line, of bounded length, whatever the message quotes
        # one write of the whole line: under torchrun the ranks share stderr, and print() writes the newline apart
        sys.stderr.write(f"error: {text[:1000]}{'...' if len(text) > 1000 else ''}\n")
        status = 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:
        status = 130
    except Exception:
        traceback.print_exc()
        status = 1
    # Exit outside the handlers: the exception's frames (holding DataLoader iterators, whose workers
    # ignore SIGTERM) are freed first, so the workers shut down instead of hanging the exit.
    sys.exit(status)
