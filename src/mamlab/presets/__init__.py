"""Configurations behind the README's results, as TOML files: ``mamlab train TASK --preset NAME``."""
