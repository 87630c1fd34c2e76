// SPDX-License-Identifier: MIT
// The dense linear algebra the inits and analyses use: randomized SVD, incremental PCA,
// a small Sylvester solver, k-means.
#pragma once

#include "deltaw.hpp"
#include "linalg/randomized_svd.hpp"
#include "linalg/incremental_pca.hpp"
#include "linalg/sylvester.hpp"
#include "linalg/kmeans.hpp"
#include "linalg/to_lora.hpp"
