"""Tools for development and tests: the bundled ServiceTitan simulator (demo, simulate, the test suite)."""
