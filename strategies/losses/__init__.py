"""Loss plug-ins; importing this package registers them in ``compress.registry.LOSSES``.

affinity (TinyCLIP cross-modal affinity mimicking), unimodal_affinity, feature_distill, clip.
"""

from strategies.losses import affinity, clip, feature_distill, unimodal_affinity  # noqa: F401
