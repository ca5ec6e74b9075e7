"""Task-stream data: LLaVA JSON, ImageFolder, the built-in synthetic inspection stream."""
