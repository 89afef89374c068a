"""Benchmarks: each script runs as ``python bench/<name>.py`` and imports as ``bench.<name>``
only (a script drops its own folder from ``sys.path``, so no bench module shadows a PyPI
package of the same name)."""
