"""The README's results tables are generated from the committed JSON (benchmarks/make_tables.py), never
edited by hand: the block between its markers must equal what make_tables writes now."""
import os

from benchmarks import make_tables


def test_readme_tables_match_the_committed_json():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert readme.count(make_tables.BEGIN) == 1 and readme.count(make_tables.END) == 1
    block = readme.split(make_tables.BEGIN, 1)[1].split(make_tables.END, 1)[0]
    assert block == f"\n{make_tables.all_tables()}\n", \
        "README.md's results differ from benchmarks/results: run python -m benchmarks.make_tables --readme"
