"""Plain helpers of the tests (fixtures are in conftest.py)."""
import csv


def read_rows(path) -> list[dict]:
    """The rows of a CSV file as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
