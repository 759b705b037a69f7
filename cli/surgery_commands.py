"""Model-surgery subcommands (merge, resize, extract)."""
