# Randomized SVD, factored spectra, PiSSA/OLoRA initialisations, intruder dimensions.
deltaw_add_test(linalg_init linalg/test_randomized_svd.cpp linalg/test_to_lora.cpp spectral/test_spectral.cpp init/test_init.cpp alloc_counter.cpp)
