# k-means, k-NN, LoDD boundary scores (fixed and adaptive ratio, aLoDD) and the spectrum report.
deltaw_add_test(spectral_extra spectral/test_lodd_kmeans.cpp spectral/test_alodd.cpp)
