import sys

from adaptdpo.cli import main

sys.exit(main())
