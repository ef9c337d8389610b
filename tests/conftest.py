"""Suite-wide settings: quiet TensorFlow logs and seed-independent test isolation."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
