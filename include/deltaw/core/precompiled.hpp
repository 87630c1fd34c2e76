// SPDX-License-Identifier: MIT
// The optional compiled mode. With DELTAW_PRECOMPILED defined (linking the CMake target
// deltaw::precompiled defines it), the functions marked below are only declared in the
// headers and defined once in the library (src/precompiled.cpp), which defines
// DELTAW_PRECOMPILED_SOURCE. Without it, everything is header-only as usual.
#pragma once

#if defined(DELTAW_PRECOMPILED) && !defined(DELTAW_PRECOMPILED_SOURCE)
/// 0 where a marked function is only declared (a TU of a deltaw::precompiled user).
#define DELTAW_DEFINE_PRECOMPILED 0
#else
#define DELTAW_DEFINE_PRECOMPILED 1
#endif

#if defined(DELTAW_PRECOMPILED_SOURCE)
/// What a marked definition is: an ordinary function in the library, inline in header-only use.
#define DELTAW_PRECOMPILED_INLINE
#else
#define DELTAW_PRECOMPILED_INLINE inline
#endif
