import sys

from fedsea_hpc.cli import main

sys.exit(main())
