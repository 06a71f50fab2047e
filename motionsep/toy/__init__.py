"""The toy world: procedural clips with ground truth, a small pretrained model, exact metrics.

- :mod:`motionsep.toy.world` renders clips of one coloured shape moving on a background.
- :mod:`motionsep.toy.metrics` reads videos back by segmentation (known palette).
- :mod:`motionsep.toy.model` defines the toy model (ZeroScope's format, toy sizes).
- :mod:`motionsep.toy.pretrain` pretrains it (``motionsep toy pretrain``).
- :mod:`motionsep.toy.experiment` runs ``motionsep toy experiment`` and ``motionsep demo``.
"""
