#include <atomic>
#include <cstdlib>
#include <cstring>

#include "tensorslim/quantize.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace tensorslim {
namespace cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
#ifdef TENSORSLIM_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAVX512;
#endif
#ifdef TENSORSLIM_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAVX2;
#endif
#endif
  return Isa::kScalar;
}

// TENSORSLIM_ISA=scalar|avx2|avx512 caps the path, e.g. to compare paths by hand.
Isa initial() {
  Isa best = detect();
  if (const char* env = std::getenv("TENSORSLIM_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "scalar")) want = Isa::kScalar;
    if (!std::strcmp(env, "avx2")) want = Isa::kAVX2;
    if (static_cast<int>(want) < static_cast<int>(best)) return want;
  }
  return best;
}

std::atomic<int>& active() {
  static std::atomic<int> a{static_cast<int>(initial())};
  return a;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAVX2: return "avx2";
    case Isa::kAVX512: return "avx512";
  }
  return "unknown";
}

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() { return static_cast<Isa>(active().load()); }

// An AVX-512 extension that this build and CPU have (`name` as __builtin_cpu_supports spells it).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(TENSORSLIM_HAVE_AVX512)
#define TS_AVX512_EXTENSION(name) (best_isa() == Isa::kAVX512 && __builtin_cpu_supports(name))
#else
#define TS_AVX512_EXTENSION(name) false
#endif

bool cpu_has_avx512_vnni() {
  static const bool has = TS_AVX512_EXTENSION("avx512vnni");
  return has;
}

bool cpu_has_avx512_vbmi() {
  static const bool has = TS_AVX512_EXTENSION("avx512vbmi");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = TS_AVX512_EXTENSION("avx512bf16");
  return has;
}

bool cpu_is_intel() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool intel = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    char v[13];
    std::memcpy(v, &b, 4);
    std::memcpy(v + 4, &d, 4);
    std::memcpy(v + 8, &c, 4);
    v[12] = 0;
    return std::strcmp(v, "GenuineIntel") == 0;
  }();
  return intel;
#else
  return false;
#endif
}

bool cpu_has_avx_vnni() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(TENSORSLIM_HAVE_AVX2)
  // CPUID leaf 7, sub-leaf 1, EAX bit 4 (clang 14's __builtin_cpu_supports has no "avxvnni");
  // the OS's YMM state is what best_isa's AVX2 check already asked for.
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return best_isa() >= Isa::kAVX2 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
  }();
#else
  static const bool has = false;
#endif
  return has;
}

namespace {

AvxVnni vnni_form() {
  if (cpu_has_avx_vnni()) return AvxVnni::kVex;
  return cpu_has_avx512_vnni() ? AvxVnni::kEvex : AvxVnni::kNone;  // best ISA AVX-512: VL too
}

// TENSORSLIM_AVX2_VNNI=1 asks for it where the CPU has a form (ignored where not, as
// TENSORSLIM_ISA ignores an ISA above the CPU's), =0 turns it off.
bool initial_vnni() {
  if (const char* env = std::getenv("TENSORSLIM_AVX2_VNNI")) {
    if (!std::strcmp(env, "1")) return vnni_form() != AvxVnni::kNone;
    if (!std::strcmp(env, "0")) return false;
  }
  return cpu_has_avx_vnni();
}

std::atomic<bool>& vnni_on() {
  static std::atomic<bool> on{initial_vnni()};
  return on;
}

}  // namespace

bool avx2_vnni_available() { return vnni_form() != AvxVnni::kNone; }

AvxVnni avx2_vnni() {
  return active_isa() == Isa::kAVX2 && vnni_on().load() ? vnni_form() : AvxVnni::kNone;
}

void set_avx2_vnni(bool on) {
  TS_CHECK_VALUE(!on || vnni_form() != AvxVnni::kNone,
                 "set_avx2_vnni: this CPU (or build) has neither AVX-VNNI nor AVX512-VNNI");
  vnni_on().store(on);
}

void set_isa(Isa isa) {
  TS_CHECK_VALUE(static_cast<int>(isa) <= static_cast<int>(best_isa()),
                 std::string("set_isa: this CPU (or build) does not support ") + isa_name(isa) +
                     "; the best available is " + isa_name(best_isa()));
  active().store(static_cast<int>(isa));
}

}  // namespace cpu
}  // namespace tensorslim
