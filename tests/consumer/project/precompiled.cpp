// A consumer of deltaw::precompiled: read_peft_adapter is only declared here (DELTAW_PRECOMPILED)
// and comes from the installed library; a missing directory must give deltaw's own error.
#include <deltaw/io.hpp>
#include <iostream>

int main() {
#ifndef DELTAW_PRECOMPILED
  std::cout << "DELTAW_PRECOMPILED is not defined by deltaw::precompiled\n";
  return 1;
#else
  try {
    (void)deltaw::io::read_peft_adapter("no-such-adapter-dir");
  } catch (const deltaw::io_error& e) {
    std::cout << "deltaw::precompiled consumer: " << e.what() << "\n";
    return 0;
  }
  return 1;
#endif
}
