"""Federated methods as plug-ins: one module per method, registered by one line.

Each method module holds a :class:`fedsim.methods.base.Method` subclass: when the config turns
it on, its rules, and the client-side, server-side and run-level hooks it needs (see
:mod:`fedsim.methods.base` for the hooks and the order they run in). The registry is
``METHODS`` in :mod:`fedsim.config.registry`: a method's name to its ``"module:Class"``, in
hook order; the methods are imported only when a run builds them
(:func:`fedsim.config.registry.enabled_methods`).

Adding a method is one module here, its test, and one line in ``METHODS`` (and, where it takes
options, its section in :mod:`fedsim.config.methods`); see the developer guide.
"""
