"""Exports people deploy: ONNX per tower (image, text) with a parity check against PyTorch, and a
Hub-ready open_clip folder with a model card written from the run.

- :mod:`compress.export.towers`: the image and text encoders as modules of one input each;
- :mod:`compress.export.onnx_export`: ``torch.onnx.export`` (the torch.export-based exporter) per tower;
- :mod:`compress.export.parity`: a batch of rendered images and their captions, ONNX Runtime against PyTorch;
- :mod:`compress.export.model_card`: the model card (``README.md``) from a run directory's config and result;
- :mod:`compress.export.hub`: open_clip's hub layout, loadable as ``open_clip.create_model_and_transforms(
  'local-dir:FOLDER')`` (a non-uniform student padded to a uniform one first);
- :mod:`compress.export.source`: what ``clip-compress export`` was given (a model or a run directory).

The optional packages (``onnx``, ``onnxruntime``, ``onnxscript``) are imported only where they are needed;
``pip install "clip-compress[onnx]"`` installs them.
"""
