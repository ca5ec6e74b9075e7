"""Task-stream data: LLaVA JSON, ImageFolder, the built-in synthetic inspection stream.

numpy + pillow + stdlib only. Main entry points:

    from kaizen.trainer.data import load_stream, builtin_stream, Task, Sample
"""

from .stream import builtin_stream, load_stream, resolve_stream
from .types import DataError, Sample, Task, normalize_answer

__all__ = ["DataError", "Sample", "Task", "builtin_stream", "load_stream", "normalize_answer",
           "resolve_stream"]
