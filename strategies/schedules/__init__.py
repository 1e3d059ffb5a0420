"""Built-in schedules.

A run's ``schedules`` mapping names what each schedule drives:

- ``lr`` (required): the learning rate; ``base_value`` = ``train.lr``;
- ``weight/<loss name>`` (or ``weight/<loss index>``, needed when two losses share a name): that
  loss term's weight at every step; ``base_value`` = the loss's configured ``weight``; logged as
  ``weight/<loss>`` in ``metrics.jsonl``. A term whose current weight is 0 is not computed.

Any other key is refused at validation. ``total_steps`` = ``train.steps`` is offered to every
schedule that declares it. Example: ``schedules: {weight/clip: {name: linear_ramp, end: 0.5, steps: 1000}}``.
"""

from strategies.schedules import lr, ramp, stages  # noqa: F401
