"""Built-in plugins, loaded through the ``edge_agent`` entry points like any other."""
