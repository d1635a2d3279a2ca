"""facegate's measurements: the protocols, metrics, plots and benchmarks. Imports `edge` (the
gate), never imported by it."""
