# The remaining systems of the papers (issue 20): Trans-LoRA, ICM-LoRA, LoRA3D, the
# computational limits of LoRA, ... — one executable, each system in its own source under
# tests/papers/ (one list(APPEND) line per source).
set(_papers_sources)
list(APPEND _papers_sources papers/test_icm_lora.cpp)
list(APPEND _papers_sources papers/test_lora_limits.cpp)
list(APPEND _papers_sources papers/test_trans_lora.cpp)
list(APPEND _papers_sources papers/test_lora3d.cpp)
list(APPEND _papers_sources papers/test_clora.cpp)
if(_papers_sources)
  deltaw_add_test(papers ${_papers_sources})
endif()
