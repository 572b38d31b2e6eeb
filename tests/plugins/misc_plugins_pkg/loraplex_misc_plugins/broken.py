"""A plugin whose import fails: loraplex must log it and carry on."""
raise RuntimeError("example_broken plugin exploded on import")
