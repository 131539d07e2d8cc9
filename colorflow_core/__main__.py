"""`python -m colorflow_core`."""
import sys

from .cli import main

sys.exit(main())
