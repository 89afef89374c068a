"""Kernel families; importing this package registers every kernel builder."""
