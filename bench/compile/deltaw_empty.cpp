// deltaw/deltaw.hpp included, nothing used.
#include <deltaw/deltaw.hpp>

int main() {}
