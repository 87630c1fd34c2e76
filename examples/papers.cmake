# The remaining systems of the papers (issue 20): one small example per system.
deltaw_add_example(trans_lora ${CMAKE_CURRENT_SOURCE_DIR}/trans_lora.cpp)
deltaw_add_example(lora3d ${CMAKE_CURRENT_SOURCE_DIR}/lora3d.cpp)
deltaw_add_example(icm_lora ${CMAKE_CURRENT_SOURCE_DIR}/icm_lora.cpp)
deltaw_add_example(lora_limits ${CMAKE_CURRENT_SOURCE_DIR}/lora_limits.cpp)
deltaw_add_example(prune_quantize ${CMAKE_CURRENT_SOURCE_DIR}/prune_quantize.cpp)  # aLoDD, coupled LoRAPrune, CBQ windows
