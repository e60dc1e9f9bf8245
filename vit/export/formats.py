"""The export formats by name, apart from their writers, so that ``vit export --help`` needs no torch."""

FORMATS = ("safetensors", "timm", "mae", "onnx", "torch-export", "aoti")
WEIGHT_FORMATS = ("safetensors", "timm", "mae")  # weights only: one image size, consumers resample on load
# opset 18 is the dynamo exporter's own; asking for 17 adds a version conversion that cannot express an
# antialiased Resize (position-embedding resampling when it is not constant-folded)
DEFAULT_OPSET = 18
