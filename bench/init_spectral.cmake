# PiSSA init (randomized vs exact SVD) and factored spectra vs the dense SVD of the
# materialised update (docs/benchmarks.md, "Initialisation and spectra").
deltaw_add_benchmark(bench_init_spectral ${CMAKE_CURRENT_SOURCE_DIR}/bench_init_spectral.cpp)
