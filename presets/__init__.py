"""Built-in presets, shipped as package data ``motionsep.presets``."""
