"""The operations surface: health and metrics listeners, logs, the preflight check."""
