// Run-time choice of the instruction set the CPU kernels use. The build compiles every kernel once per ISA
// (see triple_loss_cpu.cpp), so one binary runs at full speed on the machine that loads it, whatever machine
// built it.
#pragma once

#include <string>
#include <vector>

namespace fastdistil {

enum class CpuIsa { Vec128 = 0, Avx2 = 1, Avx512 = 2 };

// The ISA in use: FASTDISTIL_CPU_ISA (avx512 | avx2 | vec128) if set, else the best the CPU supports. vec128 is
// 16-byte vector code (SSE2 on x86-64, NEON on ARM), which every CPU runs.
CpuIsa cpu_isa();
std::string cpu_isa_name();
void set_cpu_isa(const std::string& name);
std::vector<std::string> supported_cpu_isas();

}  // namespace fastdistil
