"""kaizen.export: turns a frozen base into an ONNX bundle (once) and tasks into packs."""
