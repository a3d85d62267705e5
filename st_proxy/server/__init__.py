"""Wiring and running: create_app (the only wiring point), the runtime state, serving, drain and reload."""
