"""`python -m peftrun RECIPE` == `peftrun train RECIPE`, so `accelerate launch -m peftrun RECIPE` works."""

import sys

from peftrun.cli.main import main

sys.exit(main())
