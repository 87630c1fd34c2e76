# Singular-value spectra of W0, W_lora and W_full written by examples/intruder_spectra.
#   gnuplot -e "datafile='intruder_spectra.dat'; outfile='intruder_spectra.png'" examples/plot_spectra.gp
# Columns of the data file: index, sigma(W0), sigma(W_lora), sigma(W_full).
if (!exists("datafile")) datafile = 'intruder_spectra.dat'
if (!exists("outfile")) outfile = 'intruder_spectra.png'
set terminal pngcairo size 900,560 enhanced font ",11"
set output outfile
set title "Singular values: pre-trained vs LoRA vs full fine-tuning"
set xlabel "index i"
set ylabel "{/Symbol s}_i"
set logscale y
set grid
set key top right
plot datafile using 1:2 with linespoints pt 7 ps 0.5 lw 2 title "W_0 (pre-trained)", \
     datafile using 1:3 with linespoints pt 5 ps 0.5 lw 2 title "W_0 + sBA (LoRA)", \
     datafile using 1:4 with linespoints pt 9 ps 0.5 lw 2 title "W (full fine-tuning)"
