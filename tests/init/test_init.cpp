#include "linalg/spectrum_util.hpp"
TEST_CASE("init placeholder") {}
