"""Loss plug-ins; importing this package registers them in ``compress.registry.LOSSES``.

affinity (TinyCLIP cross-modal affinity mimicking; also CLIP-KD's CRD), unimodal_affinity, feature_distill, clip,
icl (CLIP-KD's interactive contrastive learning).
"""

from strategies.losses import affinity, clip, feature_distill, icl, unimodal_affinity  # noqa: F401
