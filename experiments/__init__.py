"""What runs: configs, sweeps, the submitit job, dispatch backends and the command line.

Importing the package installs the check of the config's ``dispatch`` section (:mod:`experiments.backends`)."""

import experiments.backends  # noqa: F401 - installs the dispatch section's check into the engine's validation
