# LoLDU, the core low-rank form (LoRA-XS, LoRA-SB, LaMDA) and Block-LoRA.
deltaw_add_test(structured_ldu_core expr/test_ldu.cpp expr/test_core_low_rank.cpp)
