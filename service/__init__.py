"""Online half: serve a model bundle over HTTP with onnxruntime. Never imports TensorFlow or training/."""
