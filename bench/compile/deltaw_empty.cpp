// SPDX-License-Identifier: MIT
// deltaw/deltaw.hpp included, nothing used.
#include <deltaw/deltaw.hpp>

int main() {}
