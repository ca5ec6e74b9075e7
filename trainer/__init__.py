"""kaizen.trainer: the central trainer (torch). Learns one task pack per inspection task.

Importing this package is cheap; torch is imported by the submodules that need it.
"""
