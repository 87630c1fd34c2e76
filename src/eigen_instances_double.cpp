// SPDX-License-Identifier: MIT
// deltaw::eigen_instances: Eigen's decompositions on MatrixXd, compiled once (see
// deltaw/core/eigen_dense.hpp). Three files so that a parallel build compiles them side by side.
#define DELTAW_EIGEN_INSTANCES_SOURCE
#include <deltaw/core/eigen_dense.hpp>

DELTAW_EIGEN_INSTANCES_DOUBLE(template)
