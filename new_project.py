"""Copy this template into a new project folder: python new_project.py ../MyProject

Leaves out saved/ outputs, .git, caches and downloaded datasets.
"""
import shutil
import sys
from pathlib import Path

IGNORE = shutil.ignore_patterns("saved", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".venv", "venv",
                                "MNIST", "FashionMNIST", "image_folder", "*.egg-info", ".mypy_cache", ".ruff_cache")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python new_project.py NEW_PROJECT_DIR", file=sys.stderr)
        return 2
    source = Path(__file__).resolve().parent
    target = Path(argv[0]).resolve()
    if target.exists():
        print(f"error: {target} already exists; choose a new directory", file=sys.stderr)
        return 2
    if source == target or source in target.parents:
        print(f"error: {target} is inside the template itself", file=sys.stderr)
        return 2
    shutil.copytree(source, target, ignore=IGNORE)
    print(f"New project created at {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
