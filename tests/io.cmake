# Interchange formats: safetensors, PEFT adapter directories, GGUF LoRA (deltaw/io.hpp).
# DLPack views (deltaw/io/dlpack.hpp) against the dlpack.h found on the system
# (Debian's libdlpack-dev: DLPack 0.6, no DLManagedTensorVersioned), and, when PyTorch is
# installed, the same test compiled against the DLPack 1.x header PyTorch ships
# (ATen/dlpack.h, copied to the build tree as dlpack/dlpack.h) for the versioned overloads.
# Header-only and without nlohmann-json, so registered before the json check below.
find_path(DELTAW_DLPACK_INCLUDE_DIR dlpack/dlpack.h)
if(DELTAW_DLPACK_INCLUDE_DIR)
  deltaw_add_test(io_dlpack io/test_dlpack.cpp)
  target_include_directories(test_io_dlpack PRIVATE ${DELTAW_DLPACK_INCLUDE_DIR})
else()
  message(STATUS "deltaw: dlpack/dlpack.h not found; test_io_dlpack skipped (install libdlpack-dev)")
endif()
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c
                          "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include', 'ATen', 'dlpack.h'))"
                  OUTPUT_VARIABLE _deltaw_torch_dlpack OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND EXISTS "${_deltaw_torch_dlpack}")
    configure_file(${_deltaw_torch_dlpack} ${CMAKE_CURRENT_BINARY_DIR}/dlpack_v1/dlpack/dlpack.h COPYONLY)
    deltaw_add_test(io_dlpack_v1 io/test_dlpack.cpp)
    target_include_directories(test_io_dlpack_v1 BEFORE PRIVATE ${CMAKE_CURRENT_BINARY_DIR}/dlpack_v1)
  endif()
endif()
# PyTorch-produced tensors (to_dlpack) through a probe library loaded with ctypes;
# skipped (exit 77) without torch.
if(DELTAW_DLPACK_INCLUDE_DIR)
  add_library(io_dlpack_probe MODULE io/dlpack_probe.cpp)
  target_link_libraries(io_dlpack_probe PRIVATE deltaw::deltaw)
  target_include_directories(io_dlpack_probe PRIVATE ${DELTAW_DLPACK_INCLUDE_DIR})
  target_compile_options(io_dlpack_probe PRIVATE -Wall -Wextra)
  if(Python3_Interpreter_FOUND)
    add_test(NAME io_dlpack_torch COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/io/check_dlpack.py
                                          --lib $<TARGET_FILE:io_dlpack_probe>)
  else()
    add_test(NAME io_dlpack_torch COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
  endif()
  set_tests_properties(io_dlpack_torch PROPERTIES SKIP_RETURN_CODE 77)
endif()

# They need nlohmann-json; without it the io tests are left out with a message.
find_package(nlohmann_json 3.10 QUIET)
if(NOT nlohmann_json_FOUND)
  message(STATUS "deltaw: nlohmann_json not found; io tests skipped (install nlohmann-json3-dev)")
  return()
endif()

deltaw_add_test(io io/test_safetensors.cpp io/test_peft.cpp io/test_gguf.cpp io/test_pattern.cpp)
target_link_libraries(test_io PRIVATE nlohmann_json::nlohmann_json)
target_compile_definitions(test_io PRIVATE DELTAW_IO_FIXTURES="${CMAKE_CURRENT_SOURCE_DIR}/fixtures"
                                           DELTAW_IO_FUZZ_CORPUS="${PROJECT_SOURCE_DIR}/fuzz/corpus")

# Hostile files, concurrent writers and overflow (issue 14): its own executable, since it
# forks writer processes and replaces operator new / delete to measure what a reader
# allocates.
deltaw_add_test(io_hardening io/test_hardening.cpp)
target_link_libraries(test_io_hardening PRIVATE nlohmann_json::nlohmann_json)
target_compile_definitions(test_io_hardening PRIVATE DELTAW_IO_FIXTURES="${CMAKE_CURRENT_SOURCE_DIR}/fixtures"
                                                   DELTAW_IO_FUZZ_CORPUS="${PROJECT_SOURCE_DIR}/fuzz/corpus")

# Structured PEFT types (LoKr, MiSS / Bone bat, VeRA, RandLoRA) and the unified reader
# (read_peft): their own executable, to keep each translation unit small. This one and the round-trip writer
# use the compiled mode (deltaw::precompiled: the directory readers and writers come from
# the library), test_io the header-only one, so both are exercised.
deltaw_add_test(io_peft_structured io/test_peft_structured.cpp io/test_peft_adapter.cpp io/test_peft_loha_ia3_oft.cpp io/test_peft_hra.cpp io/test_peft_boft_adalora.cpp io/test_peft_shira.cpp io/test_peft_road.cpp io/test_peft_hira_delora.cpp io/test_peft_gralora_unilora.cpp io/test_peft_kasa_bdlora_tinylora.cpp)
target_link_libraries(test_io_peft_structured PRIVATE nlohmann_json::nlohmann_json)
# Any adapter as a plain LoRA (io/peft_convert.hpp) against PEFT's convert_to_lora.
target_sources(test_io_peft_structured PRIVATE io/test_peft_convert.cpp)
# VB-LoRA and PVeRA (io/peft_vblora.hpp, io/peft_pvera.hpp; issue 16).
target_sources(test_io_peft_structured PRIVATE io/test_peft_vblora_pvera.cpp)
if(TARGET deltaw::precompiled)
  target_link_libraries(test_io_peft_structured PRIVATE deltaw::precompiled)
endif()
target_compile_definitions(test_io_peft_structured PRIVATE DELTAW_IO_FIXTURES="${CMAKE_CURRENT_SOURCE_DIR}/fixtures"
                                                         DELTAW_IO_FUZZ_CORPUS="${PROJECT_SOURCE_DIR}/fuzz/corpus")

# Round trip through the Python packages: deltaw writes, safetensors / gguf / PEFT read.
# Skipped (exit 77) when python3 or the packages are missing.
add_executable(io_roundtrip_writer io/roundtrip_writer.cpp)
target_link_libraries(io_roundtrip_writer PRIVATE deltaw::deltaw deltaw::eigen_instances nlohmann_json::nlohmann_json)
if(TARGET deltaw::precompiled)
  target_link_libraries(io_roundtrip_writer PRIVATE deltaw::precompiled)
endif()
target_compile_options(io_roundtrip_writer PRIVATE -Wall -Wextra)
find_package(Python3 COMPONENTS Interpreter QUIET)
foreach(part formats peft)
  if(Python3_Interpreter_FOUND)
    add_test(NAME io_roundtrip_${part}
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/io/check_roundtrip.py --part ${part}
                     --writer $<TARGET_FILE:io_roundtrip_writer> --dir ${CMAKE_CURRENT_BINARY_DIR}/io_roundtrip_${part})
  else()
    add_test(NAME io_roundtrip_${part} COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
  endif()
  set_tests_properties(io_roundtrip_${part} PROPERTIES SKIP_RETURN_CODE 77)
endforeach()


# GGUF LoRA against llama.cpp itself (tests/io/check_llama_cpp.py): a tiny Llama converted by
# llama.cpp's convert_hf_to_gguf.py, a PEFT LoRA written by deltaw and by llama.cpp's
# convert_lora_to_gguf.py, logits from llama.cpp (through llama-cpp-python's bindings) against
# the merged PyTorch model. DELTAW_LLAMA_CPP_PYTHON: an unpacked llama-cpp-python sdist (its
# llama_cpp/ package and vendor/llama.cpp/ sources); DELTAW_LLAMA_CPP_LIB: the directory
# holding the libllama built from those sources (docs/formats.md says how). The same names
# work as environment variables at test time. Skipped (exit 77) without them, torch,
# transformers or PEFT.
set(DELTAW_LLAMA_CPP_PYTHON "" CACHE PATH "unpacked llama-cpp-python sdist for the io_llama_cpp check")
set(DELTAW_LLAMA_CPP_LIB "" CACHE PATH "directory with libllama built from DELTAW_LLAMA_CPP_PYTHON's vendor/llama.cpp")
add_executable(io_llama_cpp_writer io/llama_cpp_writer.cpp)
target_link_libraries(io_llama_cpp_writer PRIVATE deltaw::deltaw deltaw::eigen_instances nlohmann_json::nlohmann_json)
target_compile_options(io_llama_cpp_writer PRIVATE -Wall -Wextra)
if(Python3_Interpreter_FOUND)
  add_test(NAME io_llama_cpp
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/io/check_llama_cpp.py
                   --writer $<TARGET_FILE:io_llama_cpp_writer> --dir ${CMAKE_CURRENT_BINARY_DIR}/io_llama_cpp
                   --llama-cpp-python "${DELTAW_LLAMA_CPP_PYTHON}" --llama-lib "${DELTAW_LLAMA_CPP_LIB}")
else()
  add_test(NAME io_llama_cpp COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
endif()
set_tests_properties(io_llama_cpp PROPERTIES SKIP_RETURN_CODE 77)
