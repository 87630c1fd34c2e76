# FourierFT, C3A and WaveFT (deltaw/fourier.hpp): their own executable, because they link FFTW
# (deltaw::fft); skipped when FFTW is absent (DELTAW_FFTW=OFF, or AUTO without it). The PEFT
# file tests join it when nlohmann-json is there.
if(TARGET deltaw_fft)
  find_package(nlohmann_json 3.10 QUIET)
  set(_fourier_sources fourier/test_fourier.cpp alloc_counter.cpp)
  if(nlohmann_json_FOUND)
    list(APPEND _fourier_sources fourier/test_peft_fourier.cpp)
  endif()
  deltaw_add_test(fourier ${_fourier_sources})
  target_link_libraries(test_fourier PRIVATE deltaw::fft)
  if(nlohmann_json_FOUND)
    target_link_libraries(test_fourier PRIVATE nlohmann_json::nlohmann_json)
    target_compile_definitions(test_fourier PRIVATE DELTAW_IO_FIXTURES="${CMAKE_CURRENT_SOURCE_DIR}/fixtures"
                                                    DELTAW_IO_FUZZ_CORPUS="${PROJECT_SOURCE_DIR}/fuzz/corpus")
  endif()
endif()

# PEFT loads what deltaw writes (tests/fourier/check_peft_fourier.py; exit 77 = skipped
# without python3, torch or peft).
if(TARGET deltaw_fft AND nlohmann_json_FOUND)
  add_executable(peft_fourier_writer fourier/peft_fourier_writer.cpp)
  target_link_libraries(peft_fourier_writer PRIVATE deltaw::fft deltaw::eigen_instances nlohmann_json::nlohmann_json)
  target_compile_options(peft_fourier_writer PRIVATE -Wall -Wextra)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    add_test(NAME fourier_peft_roundtrip
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/fourier/check_peft_fourier.py
                     --writer $<TARGET_FILE:peft_fourier_writer> --fixtures ${CMAKE_CURRENT_SOURCE_DIR}/fixtures
                     --dir ${CMAKE_CURRENT_BINARY_DIR}/fourier_peft_roundtrip)
  else()
    add_test(NAME fourier_peft_roundtrip COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
  endif()
  set_tests_properties(fourier_peft_roundtrip PROPERTIES SKIP_RETURN_CODE 77)
endif()
