import sys

from v2.bench.cli import main

sys.exit(main())
