"""`python -m onnxspfq`: the same command line as `onnxspfq`."""
import sys

from onnxspfq.cli import main

sys.exit(main())
