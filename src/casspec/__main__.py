import sys

from casspec.cli import main

sys.exit(main())
