"""What operators see: the admin port, metrics and logs."""
