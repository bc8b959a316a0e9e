import sys

from dynamo_jax.cli import main

sys.exit(main())
