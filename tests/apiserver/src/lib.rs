//! A Kubernetes API **test** server for Meshlet's end-to-end tests. Not for production.
