# Training (train/, init/eva_model.hpp): the loop, LoRA+, LoRA-FA, ALLoRA, LoRA-Pro and the
# Sylvester solver, FFA-LoRA + DP-SGD, Flat-LoRA / LoRA-GGPO, LISA, LaMDA, IncreLoRA, DiffoRA,
# O3, AdaLoRA, LoRAPrune, CBQ LoRA-Rounding, DP-SGD inside nn models and EVA from a model's
# forward passes. One executable (its files compile as unity batches); each area keeps its
# CTest name, run with doctest's source-file filter. alloc_counter.cpp replaces malloc for the
# checks that IncreLoRA's score and LoRAPrune's importance copy nothing big.
deltaw_add_test(train
  train/test_loop.cpp train/test_cbq_rounding.cpp train/test_cbq_cross_block.cpp train/test_dp_model.cpp init/test_eva_model.cpp
  train/test_lora_prune.cpp train/test_lora_prune_coupled.cpp train/test_methods_core.cpp train/test_lora_pro.cpp
  train/test_methods_ffa_dp.cpp train/test_methods_flat_lisa.cpp train/test_methods_growth.cpp
  train/test_methods_gates.cpp train/test_methods_growth_float.cpp train/test_adalora.cpp alloc_counter.cpp)
set_tests_properties(train PROPERTIES DISABLED ON)  # run below, area by area
# Batches of 6, not one unit: the 15 files as one translation unit took 335 s of g++ alone,
# more than the three batches together (GCC's time grows faster than the unit's size here).
set_target_properties(test_train PROPERTIES UNITY_BUILD_BATCH_SIZE 6)
foreach(_t IN ITEMS "train_loop;*train/test_loop.cpp" "train_cbq_rounding;*test_cbq_rounding.cpp,*test_cbq_cross_block.cpp"
                    "train_dp_model;*test_dp_model.cpp" "init_eva_model;*test_eva_model.cpp"
                    "train_lora_prune;*test_lora_prune.cpp,*test_lora_prune_coupled.cpp" "train_methods_core;*test_methods_core.cpp"
                    "train_lora_pro;*test_lora_pro.cpp"
                    "train_methods_ffa;*test_methods_ffa_dp.cpp,*test_methods_flat_lisa.cpp"
                    "train_methods_growth;*test_methods_growth.cpp,*test_methods_gates.cpp,*test_methods_growth_float.cpp,*test_adalora.cpp")
  list(GET _t 0 _name)
  list(GET _t 1 _files)
  add_test(NAME ${_name} COMMAND test_train "--source-file=${_files}")
endforeach()
