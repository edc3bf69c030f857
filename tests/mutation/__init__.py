"""A mutation check of our own: curated slips (mutants.py) planted in a copy of the tree (run.py)."""
