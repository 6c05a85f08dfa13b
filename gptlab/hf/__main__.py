import sys

from gptlab.hf.cli import main

sys.exit(main())
