//! The read-only HTTP endpoint: /pods, /healthz, /events, /metrics.
