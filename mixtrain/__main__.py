import sys

from mixtrain.cli import main

sys.exit(main())
