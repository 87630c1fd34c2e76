// SPDX-License-Identifier: MIT
// Errors of the file readers and writers (io/). Both derive from deltaw::error.
#pragma once

#include "../core/error.hpp"

DELTAW_NAMESPACE_BEGIN

/// A file (safetensors, PEFT directory, GGUF) that violates its format: bad lengths,
/// offsets out of range, malformed JSON, wrong shapes for its declared sizes, …
class format_error : public error {
 public:
  using error::error;
};

/// A well-formed file using something deltaw does not implement (a peft_type, a PEFT
/// option, a GGUF tensor type): refused loudly rather than half-loaded.
class unsupported_error : public error {
 public:
  using error::error;
};

/// The operating system refused: a file that cannot be opened, mapped, read or written.
class io_error : public error {
 public:
  using error::error;
};

DELTAW_NAMESPACE_END
