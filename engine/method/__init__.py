"""The APuDAE method: settings, networks, checkpoints and the reference purification loop."""
