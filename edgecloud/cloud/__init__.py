"""The cloud server: ONNX Runtime sessions for each bundle's cloud part behind the OIP."""
