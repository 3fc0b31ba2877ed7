"""The MLflow side of a run: everything it records, shows or registers.

- :mod:`~fedsim.tracking.tracker`: the :class:`~fedsim.tracking.tracker.Tracker`, one MLflow
  run per simulation (params, tags, per-round metrics, plots);
- :mod:`~fedsim.tracking.store`: the tracking store's URI, and the checks that it and the
  output directories can be written before anything starts;
- :mod:`~fedsim.tracking.round_report`: a round's metrics and client table from the reports;
- :mod:`~fedsim.tracking.inputs` / :mod:`~fedsim.tracking.outputs`: the data a run used and
  what a finished run leaves (adapters, plots);
- :mod:`~fedsim.tracking.merge_report` and :mod:`~fedsim.tracking.partition_report`: the merge
  diagnostics (``fedsim inspect``) and the partition table (``fedsim partition``);
- :mod:`~fedsim.tracking.system_metrics`: CPU/GPU/memory of the driver and the actors' nodes;
- :mod:`~fedsim.tracking.model_registry`: the MLflow Model Registry (register, load back);
- :mod:`~fedsim.tracking.progress`: the console's progress bar and summary.

May import :mod:`fedsim.config`, :mod:`fedsim.data`, :mod:`fedsim.models`, :mod:`fedsim.tasks`,
:mod:`fedsim.methods` and :mod:`aggregation`; never :mod:`actors` or :mod:`fedsim.simulation`.
"""
