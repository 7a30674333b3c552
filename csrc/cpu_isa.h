// Included first by the CPU loops that CMake compiles once per instruction set
// (adamw_cpu_loop.cpp, philox_cpu_loop.cpp): LIMA_CPU_NS names the namespace of that build
// (cpu_default: the baseline ISA; cpu_avx2: -mavx2 -mfma on x86-64).
#pragma once

#ifndef LIMA_CPU_NS
#error "compile with -DLIMA_CPU_NS=cpu_default or -DLIMA_CPU_NS=cpu_avx2"
#endif
