"""Op families. Importing this package registers every op in the registry."""

from compiler.ir.ops import (
    core,  # noqa: F401
    elementwise,  # noqa: F401
)
