"""onnxspfq: ONNX graph-level post-training compression with stochastic path-following quantization."""
from onnxspfq.config import CompressConfig, QuantConfig

__all__ = ["CompressConfig", "QuantConfig", "compress"]
__version__ = "0.1.0"


def compress(*args, **kwargs):
    """Compress an ONNX model; see :func:`onnxspfq.api.compress`."""
    from onnxspfq.api import compress as _compress

    return _compress(*args, **kwargs)
