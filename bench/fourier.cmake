# FourierFT, C3A, WaveFT (issue 16; FFTW) against the base GEMM; PEFT's forward of the same sizes
# is bench/compare/peft_forward.py --methods fourierft c3a waveft (docs/benchmarks.md, "PEFT methods at 4096").
if(TARGET deltaw_fft)
  deltaw_add_benchmark(bench_fourier ${CMAKE_CURRENT_SOURCE_DIR}/bench_fourier.cpp)
  target_link_libraries(bench_fourier PRIVATE deltaw::fft)
endif()
