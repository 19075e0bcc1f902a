"""Layer 1: the model registry and the architectures (importing this package registers them)."""

from imgclf.models import architectures as _architectures  # noqa: F401  (registers the built-ins)
