"""What every service shares at run time: config, gRPC bootstrap, interceptors, metrics, logs."""
