"""The model bundle: the one artifact training/ writes and service/ reads (schema, files, preprocessing)."""

from bundle.errors import BundleError
from bundle.files import Bundle, load_bundle, write_bundle
from bundle.manifest import BundleManifest
from bundle.preprocess import preprocess_image, preprocess_pil

__all__ = [
    "Bundle",
    "BundleError",
    "BundleManifest",
    "load_bundle",
    "preprocess_image",
    "preprocess_pil",
    "write_bundle",
]
