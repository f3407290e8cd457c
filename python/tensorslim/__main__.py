"""`python -m tensorslim ...`: the commands of the `tensorslim` script."""
import sys

from .cli import main

sys.exit(main())
