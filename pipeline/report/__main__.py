"""`python -m pipeline.report <folder>`."""
import sys

from pipeline.report import main

sys.exit(main())
