"""Command-line plumbing shared by train.py and test.py: user errors become one line and exit 2."""
import sys

from utils.errors import UserError


def run_main(main, argv=None):
    """Call main(argv); a UserError is printed as 'error: ...' with no traceback, exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
