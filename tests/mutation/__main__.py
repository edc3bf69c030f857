"""`python -m tests.mutation`: see run.py."""

from tests.mutation.run import main

raise SystemExit(main())
