"""kaizen.runtime: the station side of Kaizen Edge (numpy + onnxruntime, never torch).

Everything a station needs lives here: the ONNX engine, the task-pack reader/writer and
store, selection, the Station, the wire protocol and the station daemon. It imports only
stdlib, numpy, onnxruntime, pyzmq, tokenizers, pillow and cryptography; a test enforces it.
"""

__version__ = "0.2.0"
RUNTIME_VERSION = __version__
