"""UDA methods, one module each, and the registry that names them.

Importing this package registers every method and add-on; ``methods.base.registered()`` lists the
methods and every supported ``<base>+<add-on>`` composition.
"""

from methods import daformer, hrda, mic, pipa, sepico, source_only, target_oracle  # noqa: F401  (registration)
from methods.base import AddOn, Batch, Method, method_class, register, register_addon, registered

__all__ = ["AddOn", "Batch", "Method", "method_class", "register", "register_addon", "registered"]
