// SPDX-License-Identifier: MIT
// Spectral analysis of updates: factored spectra, intruder dimensions, LoDD, reports.
#pragma once

#include "linalg.hpp"
#include "spectral/factored_spectrum.hpp"
#include "spectral/intruder.hpp"
#include "spectral/lodd.hpp"
#include "spectral/report.hpp"
