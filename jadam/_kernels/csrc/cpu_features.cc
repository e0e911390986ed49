// Which of the kernels' instruction-set variants (jadam/_kernels/variants.py) this CPU and its operating system can
// run. Compiled for the architecture's baseline, with no -march, so that it loads on every CPU of the architecture;
// __builtin_cpu_supports checks CPUID and, for AVX and AVX-512, that the OS saves their registers (XGETBV).

extern "C" __attribute__((visibility("default"))) int JadamCpuFeatures() {
  int features = 0;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) features |= 1;  // "avx2"
  if (__builtin_cpu_supports("x86-64-v4")) features |= 2;  // "avx512"
  if ((features & 2) && __builtin_cpu_supports("avx512vbmi")) features |= 4;  // "avx512vbmi"
#endif
  return features;
}
