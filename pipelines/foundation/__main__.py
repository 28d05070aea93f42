"""`python -m pipelines.foundation --curated SHARDS --output DIR [dotted overrides]`."""
import sys

from pipelines.foundation.step import main

sys.exit(main())
