"""Where results go: the alert store (incidents, outbox, checkpoints), webhook and Alertmanager
delivery, and Prometheus metrics."""
