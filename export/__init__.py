"""lathe.export: ONNX export with lathe's op lowerings, validation on onnxruntime."""
