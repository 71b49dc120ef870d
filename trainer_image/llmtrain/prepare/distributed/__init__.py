"""Distributed prepare: the single pod's stage as phases of Indexed Jobs over a shared work directory.

scan (N pods) -> dedup (N) -> cluster (1) -> write (N) -> commit (1); see ``phases`` for what every
pod checks first, ``slices`` for how the inputs are cut, ``local`` to run them all on one machine.
"""
