"""What sweep.py needs of its own: the search space (space.py) and the trials' side of the study (report.py)."""
