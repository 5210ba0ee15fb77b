"""Model frontends: each turns a model format into an ember IR Graph."""
