"""The Celery side of a device: app, the one task, the content type and the command line."""
