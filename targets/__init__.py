"""Targets: hardware descriptions and TVM code generation for them."""
