"""motionsep: learn a motion from a few clips, generate it with any appearance.

The library implements the two ideas of "Separate Motion from Appearance"
(arXiv 2501.16714), temporal attention purification and the appearance
highway, on stock diffusers components. It never prints and never imports the
command-line layer; long operations report through :mod:`motionsep.progress`.
"""

__version__ = "0.1.0"

from motionsep.store import register_builtin_model

register_builtin_model("toy", "motionsep.toy.model:builtin_path")
register_builtin_model("toy-animatediff", "motionsep.toy.model:builtin_animatediff_path")
