"""What the dashboard and the alerts read: their PromQL, and the metric names they depend on."""
