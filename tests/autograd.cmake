# Autograd-lite: tape, ops, the update types' VJPs, layers and optimisers (tests/autograd/).
deltaw_add_test(autograd
  autograd/test_tape.cpp autograd/test_ops.cpp autograd/test_vjp.cpp autograd/test_optim.cpp autograd/test_nn.cpp)
