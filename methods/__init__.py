"""UDA methods, one module each, and the registry that names them.

Importing this package registers every method; ``methods.base.registered()`` lists them.
"""

from methods import daformer, hrda, source_only, target_oracle  # noqa: F401  (registration)
from methods.base import Batch, Method, method_class, register, registered

__all__ = ["Batch", "Method", "method_class", "register", "registered"]
