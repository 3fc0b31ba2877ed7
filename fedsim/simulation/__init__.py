"""The wiring layer: the one round loop, the run around it, studies, and pre-flight checks.

Only this room (and :mod:`fedsim.cli`) imports :mod:`actors`. The public entry points are
:func:`fedsim.run` and :func:`fedsim.resume`; this ``__init__`` imports nothing, so that
``fedsim.simulation.preflight`` can run before Ray or torch is loaded.
"""
