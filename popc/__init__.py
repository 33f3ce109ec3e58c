"""popc: compile Hugging Face causal LMs into ONNX models that prune their own FFNs online."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", use_oplib: bool = True, threads: int | None = None):
    """Open an exported model for generation: ``popc.load(DIR).generate("Hello")``."""
    from popc.runtime import load as _load

    return _load(path, device, use_oplib, threads)
