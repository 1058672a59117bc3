import sys

from openmm_stable.cli import main

sys.exit(main())
