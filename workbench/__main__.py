"""`python -m workbench ...` is the `workbench` command line."""
import sys

from workbench.runs.cli import main

sys.exit(main())
