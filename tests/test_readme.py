"""The README's paper-to-code tables cite `file.py:first-last` `name`: each must still be exact."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))
from linemap import REF, current  # noqa: E402


def test_readme_line_references_are_current():
    with open(os.path.join(ROOT, "README.md")) as f:
        refs = REF.findall(f.read())
    assert len(refs) >= 20                                   # the tables are there
    for path, first, last, name in refs:
        got = current(ROOT, path, name)
        assert got == (int(first), int(last)), \
            f"README cites {path}:{first}-{last} for {name}, now {got}: run python docs/linemap.py --update README.md"
