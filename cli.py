"""Command-line plumbing shared by train.py and test.py: user errors become one line and exit 2."""
import sys

from utils.errors import TrainingError, UserError


def run_main(main, argv=None):
    """Call main(argv). A UserError is printed as 'error: ...' with no traceback and exit status 2;
    a TrainingError likewise with status 1; Ctrl-C outside training exits with 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
