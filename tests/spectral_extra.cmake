# k-means, k-NN, LoDD boundary scores and the spectrum report.
deltaw_add_test(spectral_extra spectral/test_lodd_kmeans.cpp)
