"""What runs: configs, sweeps, the submitit job, dispatch backends and the command line.

The engine's config validation loads the check of the ``dispatch`` section (:mod:`experiments.backends`) by
name when it parses a config (:data:`compress.config.dispatch.BUILTIN_SETTINGS_CHECK`): nothing needs importing
first."""
