# CBQ LoRA-Rounding (AdaRound with a low-rank rounding matrix) for post-training quantisation.
deltaw_add_test(train_cbq_rounding train/test_cbq_rounding.cpp)
