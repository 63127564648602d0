"""Studies outside training proper: the offline demo, the planted benchmark, the scaling and models benchmarks."""
