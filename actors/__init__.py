"""The Ray layer: client actors, the server actor and the pool that schedules client tasks."""
