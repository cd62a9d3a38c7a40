// Stand-in for cuBLAS in the emulation build (fake_cuda_runtime.h).
#include "fake_cuda_runtime.h"
