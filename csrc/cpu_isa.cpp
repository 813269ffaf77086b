#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace fastdistil {
namespace {

// FASTDISTIL_GENERIC_ONLY builds what a CPU other than x86-64 gets, the 16-byte vector code alone: the way to
// check that build on an x86-64 machine.
bool supports(CpuIsa isa) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(FASTDISTIL_GENERIC_ONLY)
  switch (isa) {
    case CpuIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case CpuIsa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::Vec128:
      return true;
  }
  return false;
#else
  return isa == CpuIsa::Vec128;
#endif
}

const char* name_of(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512:
      return "avx512";
    case CpuIsa::Avx2:
      return "avx2";
    case CpuIsa::Vec128:
      return "vec128";
  }
  return "?";
}

CpuIsa best() {
  for (CpuIsa isa : {CpuIsa::Avx512, CpuIsa::Avx2}) {
    if (supports(isa)) return isa;
  }
  return CpuIsa::Vec128;
}

CpuIsa parse(std::string name) {
  if (name == "auto") return best();
  if (name == "scalar") {  // its name until 0.1: it was never scalar code, but 16-byte vectors
    TORCH_WARN_DEPRECATION("fastdistil: cpu isa 'scalar' is now called 'vec128' (16-byte vectors); "
                           "'scalar' will stop working in a later version");
    name = "vec128";
  }
  for (CpuIsa isa : {CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Vec128}) {
    if (name == name_of(isa)) {
      TORCH_CHECK(supports(isa), "fastdistil: cpu isa '", name, "' is not supported by this CPU (supported: ",
                  c10::Join(", ", supported_cpu_isas()), ")");
      return isa;
    }
  }
  TORCH_CHECK(false, "fastdistil: cpu isa must be one of 'auto', 'avx512', 'avx2', 'vec128', got '", name, "'");
}

CpuIsa initial() {
  const char* env = std::getenv("FASTDISTIL_CPU_ISA");
  return env && *env ? parse(env) : best();
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial())};
  return isa;
}

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(current().load()); }

std::string cpu_isa_name() { return name_of(cpu_isa()); }

void set_cpu_isa(const std::string& name) { current().store(static_cast<int>(parse(name))); }

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> out;
  for (CpuIsa isa : {CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Vec128}) {
    if (supports(isa)) out.emplace_back(name_of(isa));
  }
  return out;
}

}  // namespace fastdistil
