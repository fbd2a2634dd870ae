"""`python -m clara_jax.cli ARGS`: the `clara-jax` command."""

import sys

from clara_jax.cli import main

sys.exit(main())
