// SPDX-License-Identifier: MIT
// deltaw's host-device configuration: the CUDA runtime's small vector types (char1 …
// double4, dim3) as plain structs. libcu++ (CCCL) gives them tuple interfaces whenever it
// sees a CUDA runtime header, which in this configuration is the shim's. See cuda_runtime.h.
#pragma once

#define DELTAW_SHIM_VECTOR_TYPES(name, T)   \
  struct name##1 {                          \
    T x;                                    \
  };                                        \
  struct name##2 {                          \
    T x, y;                                 \
  };                                        \
  struct name##3 {                          \
    T x, y, z;                              \
  };                                        \
  struct name##4 {                          \
    T x, y, z, w;                           \
  };                                        \
  typedef struct name##1 name##1;           \
  typedef struct name##2 name##2;           \
  typedef struct name##3 name##3;           \
  typedef struct name##4 name##4;

DELTAW_SHIM_VECTOR_TYPES(char, signed char)
DELTAW_SHIM_VECTOR_TYPES(uchar, unsigned char)
DELTAW_SHIM_VECTOR_TYPES(short, short)
DELTAW_SHIM_VECTOR_TYPES(ushort, unsigned short)
DELTAW_SHIM_VECTOR_TYPES(int, int)
DELTAW_SHIM_VECTOR_TYPES(uint, unsigned int)
DELTAW_SHIM_VECTOR_TYPES(long, long)
DELTAW_SHIM_VECTOR_TYPES(ulong, unsigned long)
DELTAW_SHIM_VECTOR_TYPES(longlong, long long)
DELTAW_SHIM_VECTOR_TYPES(ulonglong, unsigned long long)
DELTAW_SHIM_VECTOR_TYPES(float, float)
DELTAW_SHIM_VECTOR_TYPES(double, double)
#undef DELTAW_SHIM_VECTOR_TYPES

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
