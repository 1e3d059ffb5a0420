"""Built-in schedules.

A run's ``schedules`` mapping names what each schedule drives:

- ``lr`` (required): the learning rate; ``base_value`` = ``train.lr``;
- ``weight/<loss name>`` (or ``weight/<loss index>``, needed when two losses share a name): that
  loss term's weight at every step; ``base_value`` = the loss's configured ``weight``; logged as
  ``weight/<loss>`` in ``metrics.jsonl``. A term whose current weight is 0 is not computed.

A weight schedule may follow another term's weight: ``complement`` (``of: weight/<loss>``) is
``weight * (1 - lambda(t))``, lambda(t) that term's weight at step t: MobileCLIP's
L = (1 - lambda) L_CLIP + lambda L_distill with lambda on any schedule (:mod:`strategies.schedules.complement`).

Any other key is refused at validation. ``total_steps`` = ``train.steps`` is offered to every
schedule that declares it. Example: ``schedules: {weight/clip: {name: linear_ramp, end: 0.5, steps: 1000}}``.
"""

from strategies.schedules import complement, lr, ramp, stages  # noqa: F401
