"""Pruning methods built on the core: OBD/Taylor (``obd``, ``hessian``), ``iterative``, ``lottery``, ``oneshot``, ``structural``.

Each method uses the core's schedules, criteria, granularities, scope and mask
keeper; none keeps masks of its own.
"""
