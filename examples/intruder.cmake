# LoRA vs full fine-tuning: intruder dimensions and singular-value spectra (plot with
# examples/plot_spectra.gp).
deltaw_add_example(intruder_spectra ${CMAKE_CURRENT_SOURCE_DIR}/intruder_spectra.cpp)
