// SPDX-License-Identifier: MIT
// deltaw's Fourier update types, which need FFTW3 (link deltaw::fft, or -lfftw3 -lfftw3f):
//   FourierFT  ΔW = s·Re(ifft2(S)), S a sparse spectrum          (expr/fourierft.hpp)
//   C3A        ΔW block-circulant, applied by FFT per block      (expr/c3a.hpp)
//   WaveFT     ΔW = s·IDWT2 (Haar) of sparse coefficients         (expr/waveft.hpp; no FFT)
// with their evaluators and VJPs. Kept out of deltaw/deltaw.hpp so that the core neither
// depends on FFTW nor pays for its header. Include deltaw/deltaw.hpp (or what it includes)
// for the operations; this header adds the types. PEFT adapter files of these types:
// deltaw/io/peft_fourier.hpp (needs nlohmann-json as well).
#pragma once

#include "deltaw.hpp"
#include "expr/fourierft.hpp"
#include "expr/c3a.hpp"
#include "backend/cpu/fftw.hpp"
#include "backend/cpu/fourierft.hpp"
#include "backend/cpu/c3a.hpp"
#include "backend/cpu/fourierft_vjp.hpp"
#include "backend/cpu/c3a_vjp.hpp"
#include "expr/waveft.hpp"
#include "backend/cpu/waveft.hpp"
#include "backend/cpu/waveft_vjp.hpp"
