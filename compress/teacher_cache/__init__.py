"""The teacher-output cache (MobileCLIP's reinforced data): the frozen teachers' outputs for ``num_augmentations``
fixed views of every training sample, written once and read by every run of a sweep.

- :mod:`~compress.teacher_cache.identity` (torch-free): what a cache is a function of, its id, folder and size;
- :mod:`~compress.teacher_cache.store`: the files, :class:`~compress.teacher_cache.store.CacheStore` reads them;
- :mod:`~compress.teacher_cache.generate`: writes them (resumable, split in parts, locked per shard), verifies them.

Nothing is imported here, so that importing the torch-free identity module loads no torch.
"""
